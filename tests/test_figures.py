"""Figures, the feature inspector and the HTML report, on small synthetic data.

Figures are checked on their structure (trace types, axis titles, data equal to the inputs);
the inspector runs on a tiny random model + tiny SAE; the report must be self-contained.
"""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from spare_tl import viz as F
from spare_tl.features import FunctionalFeatures, select_functional_features
from spare_tl.stages.behaviours import GroupedPrompts
from spare_tl.stages.statistics import LayerStatistics
from spare_tl.viz import build_report, classify_result, load_report_inputs
from spare_tl.viz.inspector import (
    inspect_feature,
    latent_statistics,
    layer_drivers,
    logit_lens,
    top_activating_prompts,
)

torch.set_num_threads(1)
D_SAE = 64
LAYERS = (1, 2, 3)


def make_statistics(layer: int, seed: int = 0) -> LayerStatistics:
    g = torch.Generator().manual_seed(seed + layer)
    mi = torch.rand(D_SAE, generator=g, dtype=torch.float64) * layer
    mi[::5] = 0.0
    return LayerStatistics(
        layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post",
        sae_id=f"sae-{layer}",
        mutual_information=mi,
        expectation=torch.randn(D_SAE, generator=g),
        context_activations=torch.rand(D_SAE, generator=g),
        memory_activations=torch.rand(D_SAE, generator=g),
        n_context=10,
        n_memory=8,
    )


@pytest.fixture(scope="module")
def statistics() -> dict[int, LayerStatistics]:
    return {layer: make_statistics(layer) for layer in LAYERS}


@pytest.fixture(scope="module")
def features(statistics) -> FunctionalFeatures:
    from spare_tl.features import DirectionSetting
    from spare_tl.stages.selection import functional_features

    return functional_features(
        statistics, DirectionSetting(proportion=0.2, edit_strength=1.0), model_name="tiny-llama"
    )


def evaluation_json() -> dict:
    def cond(c, m, cs, ms):
        return {"EM_C": c, "EM_M": m, "EM_C_std": cs, "EM_M_std": ms, "neither": 100 - c - m}

    return {
        "model": "tiny-llama",
        "dataset": "builtin",
        "n_items": 20,
        "seeds": [0, 1],
        "demo_type": "doo",
        "no_steering": cond(40.0, 30.0, 1.0, 2.0),
        "steer_to_context": cond(70.0, 10.0, 3.0, 1.5),
        "steer_to_memory": cond(15.0, 55.0, 2.5, 4.0),
        "transitions": {"EM_C->M": {"mean": 50.0, "std": 5.0}},
        "per_relation": {},
    }


def sweep_records() -> list[dict]:
    return [
        {"proportion": k, "edit_strength": a, "direction": d, "EM_C": 10 * a + k, "EM_M": 5 * a}
        for k in (0.05, 0.1)
        for a in (1.0, 2.0, 3.0)
        for d in ("context", "memory")
    ]


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def test_layerwise_mutual_information(statistics):
    fig = F.layerwise_mutual_information(statistics, proportion=0.2, top_k=(4, 16))
    types = [type(t).__name__ for t in fig.data]
    assert types == ["Bar", "Scatter", "Scatter", "Bar", "Bar"]
    totals = [float(statistics[layer].mutual_information.sum()) for layer in LAYERS]
    np.testing.assert_allclose(fig.data[0].y, totals)
    assert list(fig.data[0].x) == list(LAYERS)
    top4 = [
        float(statistics[lay].mutual_information.sort(descending=True).values[:4].sum())
        for lay in LAYERS
    ]
    np.testing.assert_allclose(fig.data[1].y, top4)
    for layer, n_ctx, n_mem in zip(LAYERS, fig.data[3].y, fig.data[4].y):
        s = statistics[layer]
        ctx, mem = select_functional_features(s.mutual_information, s.expectation, 0.2)
        assert (n_ctx, n_mem) == (ctx.numel(), mem.numel())
    assert fig.data[3].name == "context features" and fig.data[4].name == "memory features"
    assert fig.layout.xaxis2.title.text == "layer"
    assert "mutual information" in fig.layout.yaxis.title.text
    assert "proportion K = 0.2" in str(fig.layout.annotations)


def test_mutual_information_scatter(statistics, features):
    s, lf = statistics[2], features.layers[2]
    fig = F.mutual_information_scatter(s, features=lf, layer=2)
    names = [t.name.split(" (")[0] for t in fig.data]
    assert names == ["other latents", "context features", "memory features"]
    shown = np.concatenate([t.customdata[:, 0] for t in fig.data]).astype(int)
    assert (s.mutual_information[shown] > 0).all()
    assert len(shown) == int((s.mutual_information > 0).sum())
    ctx = fig.data[1]
    ids = ctx.customdata[:, 0].astype(int)
    assert set(ids) == set(lf.context_features.tolist())
    np.testing.assert_allclose(ctx.x, s.expectation[ids].double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ctx.y, s.mutual_information[ids].numpy())
    np.testing.assert_allclose(ctx.customdata[:, 1], s.context_activations[ids].numpy(), rtol=1e-6)
    assert "z̄_C" in ctx.hovertemplate and "latent" in ctx.hovertemplate
    assert fig.layout.yaxis.title.text.startswith("mutual information")
    assert fig.layout.xaxis.title.text.startswith("expectation")
    # top_n keeps it light, but never drops a selected feature
    small = F.mutual_information_scatter(s, features=lf, top_n=1)
    n = sum(len(t.x) for t in small.data)
    assert n <= 1 + lf.context_features.numel() + lf.memory_features.numel()


def test_latent_activation_distribution():
    codes = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    labels = torch.tensor([1, 1, 0, 0, 1, 0])
    fig = F.latent_activation_distribution(codes, labels, latent=1, layer=3)
    assert [type(t).__name__ for t in fig.data] == ["Histogram", "Histogram"]
    np.testing.assert_allclose(fig.data[0].x, [1.0, 3.0, 9.0])
    np.testing.assert_allclose(fig.data[1].x, [5.0, 7.0, 11.0])
    assert fig.data[0].name.startswith("use context")
    assert fig.layout.xaxis.title.text == "SAE latent activation z"
    fig = F.latent_activation_distribution(codes[:, 0], ["context"] * 3 + ["neither"] * 3)
    assert [t.name.split(" ")[0] for t in fig.data] == ["use", "neither"]
    with pytest.raises(ValueError, match="labels"):
        F.latent_activation_distribution(codes, labels[:3], latent=0)


def test_steering_results():
    data = evaluation_json()
    fig = F.steering_results(data)
    assert [type(t).__name__ for t in fig.data] == ["Bar", "Bar", "Bar"]
    em_c, em_m = fig.data[0], fig.data[1]
    assert list(em_c.x) == ["no steering", "steer to context", "steer to memory"]
    assert list(em_c.y) == [40.0, 70.0, 15.0]
    assert list(em_c.error_y.array) == [1.0, 3.0, 2.5]
    assert list(em_m.y) == [30.0, 10.0, 55.0]
    assert list(em_m.error_y.array) == [2.0, 1.5, 4.0]
    assert fig.layout.yaxis.title.text == "exact match (%)"
    assert "tiny-llama" in fig.layout.title.text


def test_steering_sweep_over_edit_strength():
    recs = sweep_records()
    fig = F.steering_sweep(recs, x="edit_strength")
    assert all(isinstance(t, go.Scatter) for t in fig.data)
    # 2 directions x 2 proportions x 2 metrics
    assert len(fig.data) == 8
    assert fig.layout.xaxis.title.text == "edit strength α"
    assert fig.layout.annotations[0].text == "steer to context"
    first = fig.data[0]
    assert first.name == "proportion K = 0.05, EM_C"
    assert list(first.x) == [1.0, 2.0, 3.0]
    assert list(first.y) == [10.05, 20.05, 30.05]
    fig = F.steering_sweep(recs, x="proportion", baseline=evaluation_json())
    assert fig.layout.xaxis.title.text == "proportion K"
    assert any("without steering" in str(a.text) for a in fig.layout.annotations)


def test_layer_steering_effect_accepts_evaluation_records():
    recs = [{"layer": lay, **evaluation_json()} for lay in (4, 2)]
    fig = F.layer_steering_effect(recs)
    assert fig.layout.xaxis.title.text == "layer"
    assert list(fig.data[0].x) == [2, 4]
    assert list(fig.data[0].y) == [70.0, 70.0]
    with pytest.raises(ValueError, match="direction"):
        F.layer_steering_effect([{"layer": 1, "EM_C": 1.0}])


def test_behaviour_table():
    records = [
        {"prompt": "p", "label": label, "demo_type": t, "shots": k}
        for t, labels in (("dss", ["context"] * 3 + ["memory"]), ("dso", ["memory", "neither"]))
        for k in (3, 4)
        for label in labels
    ]
    grouped = GroupedPrompts("tiny", records)
    fig = F.behaviour_table(grouped)
    assert [t.name for t in fig.data] == [
        "uses context (answers C)",
        "uses memory (answers M)",
        "neither",
    ]
    x = fig.data[0].x
    assert list(x[1]) == ["3-shot", "4-shot", "3-shot", "4-shot"]
    assert x[0][0].startswith("dss")
    assert list(fig.data[0].y) == [75.0, 75.0, 0.0, 0.0]
    assert list(fig.data[1].y) == [25.0, 25.0, 50.0, 50.0]
    assert list(fig.data[0].customdata) == [4, 4, 2, 2]
    # the paper's record objects give the same shares
    from spare_tl.studies.original import OriginalPromptRecord

    orig = [
        OriginalPromptRecord(
            0, r["demo_type"], r["shots"], 0, r["label"], "", (), (), False, False, (), 1.0, 1.0
        )
        for r in records
    ]
    assert F.behaviour_shares(orig) == grouped.table()


# --------------------------------------------------------------------------------------
# Inspector
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae():
    from spare_tl.testing import tiny_sae

    return tiny_sae("blocks.1.hook_resid_post", d_in=32, d_sae=D_SAE)


def test_logit_lens_matches_decoder_times_unembedding(tiny_model, sae):
    lens = logit_lens(tiny_model, sae, 5, k=4)
    expected = (sae.W_dec[5] @ tiny_model.W_U).detach()
    top = torch.topk(expected, 4)
    assert [t["token_id"] for t in lens["promoted"]] == top.indices.tolist()
    np.testing.assert_allclose([t["logit"] for t in lens["promoted"]], top.values, rtol=1e-5)
    assert lens["promoted"][0]["token"] == tiny_model.tokenizer.decode([top.indices[0].item()])
    assert lens["suppressed"][0]["token_id"] == int(expected.argmin())


def test_inspect_feature_on_tiny_model(tiny_model, sae, statistics, features):
    from spare_tl.saes import encode_latents

    prompts = ["context: a\nquestion: b\nanswer:", "question: c\nanswer:", "hello world"]
    _, store = tiny_model.run_with_cache(prompts[0], names_filter="blocks.1.hook_resid_post")
    resid = torch.stack(
        [
            tiny_model.run_with_cache(p, names_filter="blocks.1.hook_resid_post")[1][
                "blocks.1.hook_resid_post"
            ][0, -1]
            for p in prompts
        ]
    )
    codes = encode_latents(sae, resid).detach()
    latent = int(codes.sum(0).argmax())
    records = [
        {"prompt": p, "label": lab} for p, lab in zip(prompts, ["context", "memory", "neither"])
    ]
    report = inspect_feature(
        2,
        latent,
        statistics=statistics[2],
        features=features.layers[2],
        codes=codes,
        prompts=records,
        model=tiny_model,
        sae=sae,
        k=3,
    )
    acts = [p["activation"] for p in report.top_prompts]
    assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
    assert report.top_prompts[0]["activation"] == pytest.approx(float(codes[:, latent].max()))
    assert report.top_prompts[0]["prompt"] == prompts[int(codes[:, latent].argmax())]
    assert len(report.promoted_tokens) == 3
    assert report.statistics["latent"] == latent
    assert report.statistics["mutual_information"] == pytest.approx(
        float(statistics[2].mutual_information[latent])
    )
    md, page = report.to_markdown(), report.to_html()
    assert f"latent {latent}" in md and "Promotes" in md
    assert "<table" in page and "&lt;" not in md


def test_top_activating_prompts_skips_inactive():
    codes = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.0]])
    out = top_activating_prompts(codes, ["a", "b", "c"], 0, k=5)
    assert [(r["index"], r["rank"]) for r in out] == [(1, 1), (2, 2)]
    with pytest.raises(ValueError, match="do not match"):
        top_activating_prompts(codes, ["a"], 0)


def test_latent_statistics_role_and_rank(statistics, features):
    s, lf = statistics[3], features.layers[3]
    top = int(lf.context_features[0]) if lf.context_features.numel() else int(lf.memory_features[0])
    st = latent_statistics(s, top, features=lf)
    assert st["role"] in ("context feature", "memory feature")
    assert (
        st["mutual_information_rank"]
        == int((s.mutual_information > s.mutual_information[top]).sum()) + 1
    )
    assert st["z̄_C"] == pytest.approx(float(s.context_activations[top]))


def test_layer_drivers_rank_by_mutual_information(statistics, features, tiny_model, sae):
    s, lf = statistics[2], features.layers[2]
    drivers = layer_drivers(s, features=lf, top=3)
    assert drivers.layer == 2
    ids = [r["latent"] for r in drivers.context]
    assert set(ids) <= set(lf.context_features.tolist())
    mis = [r["mutual_information"] for r in drivers.context]
    assert mis == sorted(mis, reverse=True) and len(ids) == min(3, lf.context_features.numel())
    assert all(r["expectation"] < 0 for r in drivers.memory)
    # without a selection: every latent with E > 0 / E < 0 is a candidate
    free = layer_drivers(s, top=100)
    assert len(free.context) == int((s.expectation > 0).sum())
    with_tokens = layer_drivers(s, proportion=0.2, top=2, model=tiny_model, sae=sae, n_tokens=3)
    assert len(with_tokens.context[0]["tokens"]) == 3
    md, page = with_tokens.to_markdown(), with_tokens.to_html()
    assert "context features" in md and "memory features" in md and "promotes" in md
    assert 'class="drivers context"' in page and "K = 0.2" in page


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _script_srcs(page: str) -> list[str]:
    return re.findall(r"<script[^>]*\ssrc\s*=", page, flags=re.I)


def test_report_is_self_contained(statistics, features):
    grouped = GroupedPrompts(
        "tiny",
        [
            {"prompt": "p", "label": lab, "demo_type": "dss", "shots": 3}
            for lab in ("context", "memory", "neither")
        ],
    )
    page = build_report(
        features=features,
        statistics=statistics,
        results=[
            ("eval", evaluation_json()),
            ("alpha-sweep", sweep_records()),
            ("per-layer", [{"layer": 1, "direction": "context", "EM_C": 1.0, "EM_M": 2.0}]),
        ],
        grouped=grouped,
    )
    assert page.startswith("<!DOCTYPE html>")
    assert _script_srcs(page) == []
    assert page.count('<script type="text/javascript">/**\n* plotly.js') == 1
    n_figures = len(re.findall(r'<div id="figure-\d+"', page))
    # results, 2 sweeps, per-layer, layer-wise MI, scatter, behaviour table
    assert n_figures == 7
    n_cards = page.count("<details class='feature-card'")
    assert n_cards == sum(a + b for a, b in features.counts().values())
    assert len(re.findall(r'<div id="card-\d+"', page)) == n_cards
    assert "Missing parts" not in page
    assert "what drives context" in page and "EM_C (%)" in page and "70.0 ± 3.0" in page


def test_report_shows_the_memory_sets_layers(statistics):
    import dataclasses

    from spare_tl.features import DirectionSetting
    from spare_tl.stages.selection import functional_features

    main = functional_features(
        statistics, DirectionSetting(layers=(1,), proportion=0.2), model_name="tiny-llama"
    )
    memory_set = functional_features(
        statistics,
        DirectionSetting(layers=(3,), proportion=0.5, edit_strength=1.5),
        model_name="tiny-llama",
    )
    features = dataclasses.replace(main, to_memory=memory_set)
    page = build_report(features=features, statistics=statistics)
    assert "Layer 1: what drives context" in page and "Layer 3: what drives context" in page
    assert "Layer 2: what drives context" not in page
    assert "steering to memory uses its own set: layers [3], K = 0.5, α = 1.5" in page


def test_report_lists_missing_parts(tmp_path):
    inputs = load_report_inputs(
        features=tmp_path / "nope",
        statistics=tmp_path,
        results=[tmp_path],
        grouped=tmp_path,
        baselines=tmp_path / "no-baselines",
        probes=tmp_path / "no-probes",
        scan=tmp_path / "no-scan",
    )
    assert inputs.features is None and not inputs.statistics and not inputs.results
    assert inputs.scan is None
    joined = "\n".join(inputs.missing)
    for part in (
        "functional features",
        "feature statistics",
        "steering results",
        "grouped prompts",
    ):
        assert part in joined
    page = build_report(**inputs.kwargs())
    assert "Missing parts" in page and "no features.json" in page
    assert "plotly.js" not in page  # no figures, no JavaScript


def test_report_reads_saved_stages(tmp_path, statistics, features):
    root = tmp_path / "tiny"  # cache_data/<model>/<stage>
    for s in statistics.values():
        s.save(root / "mutual_information" / f"layer{s.layer}")
    features.save(root / "functional_features")
    (root / "results").mkdir()
    (root / "results" / "eval.json").write_text(json.dumps(evaluation_json()))
    (root / "results" / "junk.json").write_text(json.dumps({"foo": 1}))
    inputs = load_report_inputs(model="tiny", cache_root=tmp_path)
    assert sorted(inputs.statistics) == list(LAYERS)
    assert inputs.features is not None and len(inputs.results) == 2
    absent = ("grouped prompts", "baselines", "probes", "feature examples", "causal effect")
    assert [m for m in inputs.missing if not m.startswith(absent)] == []
    page = build_report(**inputs.kwargs())
    assert "junk: not an evaluation result" in page


def test_classify_result():
    assert classify_result(evaluation_json()) == "evaluation"
    assert classify_result(sweep_records()) == "sweep"
    assert classify_result({"records": sweep_records()}) == "sweep"
    assert classify_result([{"layer": 1, "direction": "context", "EM_C": 1, "EM_M": 2}]) == "layers"
    assert classify_result({"x": 1}) == "unknown"


def test_report_command_writes_the_page(tmp_path, capsys):
    from spare_tl.cli import main

    out = tmp_path / "r.html"
    rc = main(
        [
            "report",
            "--features",
            str(tmp_path / "none"),
            "--statistics",
            str(tmp_path),
            "--results",
            str(tmp_path),
            "--grouped",
            str(tmp_path),
            "--output",
            str(out),
        ]
    )
    assert rc == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "missing: functional features" in printed and f"wrote {out}" in printed


# --------------------------------------------------------------------------------------
# Baselines and conflict probes: the figure and the report's sections
# --------------------------------------------------------------------------------------

BASELINE_SETTINGS = {
    "none": {},
    "spare": {
        "context": {"layers": [1, 2], "proportion": 0.2, "edit_strength": 3.0},
        "memory": {"layers": [1, 2], "proportion": 0.2, "edit_strength": 3.0},
    },
    "icl": {"context": {"demo_type": "dss"}, "memory": {"demo_type": "dso"}},
    "cad": {"context": {"alpha": 1.0}, "memory": {"alpha": -1.0}},
}
# (answers C, answers M) of the 4 items per seed (seeds 0, 1); the rest answer neither
BASELINE_COUNTS = {
    "no_steering": [(1, 2), (2, 1)],
    "steer_to_context": [(3, 0), (4, 0)],
    "steer_to_memory": [(0, 3), (1, 2)],
}


def write_baselines(directory) -> dict[str, dict]:
    """``<method>.json`` (EvaluationResult.save), a sweep file and ``table.json`` written by
    ``run_table`` itself (reusing the saved results), as ``spare-tl baselines``."""
    from types import SimpleNamespace

    from spare_tl.stages.evaluation import EvaluationConfig, EvaluationResult, summarise
    from spare_tl.studies import baselines as bl
    from spare_tl.studies.baseline_sweep import save_method_sweep

    config = EvaluationConfig(seeds=(0, 1), n_shots=3)
    relations = ["capital", "capital", "author", "author"]

    def labels(n_context: int, n_memory: int) -> list[str]:
        return ["context"] * n_context + ["memory"] * n_memory + ["neither"] * 4

    for k, (name, settings) in enumerate(BASELINE_SETTINGS.items()):
        conds = ["no_steering"] if name == "none" else list(BASELINE_COUNTS)
        weaker = int(name in ("spare", "cad"))  # one answer M less when steered: varied rows
        per_cond = {
            c: {
                s: labels(n_c, n_m - weaker * (c != "no_steering"))[:4]
                for s, (n_c, n_m) in zip(config.seeds, BASELINE_COUNTS[c])
            }
            for c in conds
        }
        summary = summarise(per_cond, relations, list(config.seeds))
        summary["method"] = {
            "name": name,
            "hyperparameters": settings,
            "inference_time": name != "icl",
            "extra_forward_passes_per_token": 1.0 if name == "cad" else 0.0,
            "seconds_per_item": {c: 0.1 * (1 + k) for c in conds},
            "time_relative_to_no_steering": {
                c: 1.0 + 0.5 * k * (c != "no_steering") for c in conds
            },
        }
        summary["protocol"] = {"n_shots": 3, "max_new_tokens": 12, "batch_size": 16}
        records = [{"seed": s, "question": f"question {i}?"} for s in (0, 1) for i in range(4)]
        result = EvaluationResult("tiny-llama", "builtin", 4, [0, 1], "doo", summary, records)
        result.save(directory / f"{name}.json", directory / f"{name}-predictions.jsonl")
    sweep = [
        {"method": "cad", "direction": d, "hyperparameters": {"alpha": a}, "n": 4}
        | {"EM_C": 50.0, "EM_M": 25.0, "neither": 25.0}
        for d, a in (("none", 0.0), ("context", 1.0), ("memory", -1.0))
    ]
    save_method_sweep(sweep, directory / "sweep-cad.json", {"method": "cad"})
    setup = SimpleNamespace(  # answers only with the saved settings: run_table reuses them all
        test=[SimpleNamespace(question=f"question {i}?") for i in range(4)],
        pool=[],
        model=None,
        dataset="builtin",
        progress=False,
        method=lambda n: SimpleNamespace(hyperparameters=lambda d: BASELINE_SETTINGS[n][d]),
    )
    results = bl.run_table(
        setup, list(BASELINE_SETTINGS), config=config, n_items=None, out_dir=directory, reuse=True
    )
    return results


def write_probes(directory, *, with_sae: bool = True) -> dict:
    """The files of ``spare_tl.studies.probes.run_probe_study``, written by its own classes."""
    from spare_tl.cache import write_json
    from spare_tl.studies import probes as P

    config = {"n_questions": 12, "n_prompts": 24, "test_fraction": 0.25, "seeds": [0, 1]}
    config["Cs"] = list(P.DEFAULT_CS)

    def results(kind, layers, shift):
        scores = {
            k: P.LayerProbeScores(
                k,
                [0.6 + shift * k, 0.64 + shift * k],
                [0.7 + shift * k, 0.66 + shift * k],
                [0.1, 0.3],
                [5, 7],
            )
            for k in layers
        }
        return P.ProbeResults(kind, "tiny-llama", scores, config=config)

    resid = results("resid", (1, 2, 3), 0.08)
    resid.save(directory / "resid" / "results.json")
    sae = results("sae", (2, 3), 0.05)
    if with_sae:
        sae.save(directory / "sae" / "results.json")
    probe = P.ConflictProbe(2, torch.ones(8), 0.1, torch.zeros(8), torch.ones(8), 0.5, 0.3)
    probe.save(directory / "conflict_probe")
    mi = torch.zeros(D_SAE)
    mi[[3, 7, 5]] = torch.tensor([0.3, 0.2, 0.1])
    weight = torch.zeros(D_SAE)
    weight[[5, 3, 9]] = torch.tensor([0.9, -0.5, 0.2])
    latents = {
        2: P.ConflictLatents(
            layer=2,
            top_by_weight=[5, 3, 9],
            top_by_mutual_information=[3, 7, 5],
            weight=weight,
            mutual_information=mi,
            expectation=torch.linspace(-1, 1, D_SAE),
            context_features=[3, 4],
            memory_features=[9],
            n_active=30,
            C=0.3,
        )
    }
    write_json(directory / "latents.json", {str(k): v.to_json() for k, v in latents.items()})

    def cond(m, c):
        return {"EM_M": m, "EM_M_std": 1.5, "EM_C": c, "EM_C_std": 0.5, "neither": 100 - m - c}

    summary = {
        "model": "tiny-llama",
        "n_items": 10,
        "seeds": [0, 1, 2],
        "direction": "memory",
        "demo_type": "doo",
        "n_shots": 3,
        "edit_strength": 3.0,
        "feature_layers": [2, 3],
        "probe": {"layer": 2, "threshold": 0.5, "C": 0.3},
        "conflict": {
            "no_steering": cond(20.0, 60.0),
            "steer_always": cond(45.0, 30.0),
            "steer_on_conflict": cond(41.0, 33.0),
        },
        "no_conflict": {
            "no_steering": cond(80.0, 0.0),
            "steer_always": cond(70.0, 0.0),
            "steer_on_conflict": cond(79.0, 0.0),
        },
        "probe_on_eval": {
            "flagged_conflict": 90.0,
            "flagged_conflict_std": 2.0,
            "flagged_no_conflict": 10.0,
            "flagged_no_conflict_std": 1.0,
            "auroc": 0.93,
            "auroc_std": 0.01,
            "gate_rows": 60,
            "gate_flagged": 30,
        },
        "checks": {
            "target_metric_on_conflict_rows": "EM_M",
            "conflict_gain_always": 25.0,
            "conflict_gain_conditional": 21.0,
            "no_conflict_accuracy_drop_always": 10.0,
            "no_conflict_accuracy_drop_conditional": 1.0,
            "no_conflict_within_2_points": True,
        },
    }
    P.ConditionalResult(summary).save(directory / "conditional" / "results.json")
    return {"resid": resid, "sae": sae, "probe": probe, "latents": latents, "summary": summary}


def _n_figures(page: str) -> int:
    return len(re.findall(r'<div id="figure-\d+"', page))


def test_method_comparison(tmp_path):
    from spare_tl.studies.baselines import table_rows

    results = write_baselines(tmp_path / "baselines")
    table = json.loads((tmp_path / "baselines" / "table.json").read_text())
    rows = table["rows"]
    fig = F.method_comparison(rows)
    assert [type(t).__name__ for t in fig.data] == ["Bar", "Bar"]
    em_c, em_m = fig.data
    assert list(em_c.x) == list(em_m.x) == ["none", "spare", "icl", "cad"]
    assert list(em_c.y) == [r["EM_C"] for r in rows]
    assert list(em_c.error_y.array) == [r["EM_C_std"] for r in rows]
    assert list(em_m.y) == [r["EM_M"] for r in rows]
    assert list(em_m.error_y.array) == [r["EM_M_std"] for r in rows]
    # none: unsteered; spare: steered to context (3 and 4 of 4 items answer C)
    assert em_c.y[0] == results["none"]["no_steering"]["EM_C"] == 37.5
    assert em_c.y[1] == results["spare"]["steer_to_context"]["EM_C"] == 87.5
    assert em_m.y[1] == results["spare"]["steer_to_memory"]["EM_M"]
    assert em_c.name == "EM_C, steering to context" and em_m.name == "EM_M, steering to memory"
    assert [list(c) for c in em_c.customdata][3][:2] == [
        1.0,
        rows[3]["time_relative_to_no_steering"],
    ]
    assert fig.layout.xaxis.title.text == "method"
    assert fig.layout.yaxis.title.text == "exact match (%)"
    assert fig.layout.barmode == "group" and fig.layout.title.text
    # table.json and the method -> result mapping give the same figure
    assert rows == json.loads(json.dumps(table_rows(results)))
    for other in (F.method_comparison(table), F.method_comparison(results)):
        assert [list(t.y) for t in other.data] == [list(em_c.y), list(em_m.y)]
    with pytest.raises(ValueError, match="no methods"):
        F.method_comparison([])


def test_report_shows_baselines_and_probes(tmp_path, features):
    root = tmp_path / "tiny"  # features of model "tiny-llama" in cache_data/tiny/
    features.save(root / "functional_features")
    results = write_baselines(root / "baselines")
    saved = write_probes(tmp_path / "tiny-llama" / "probes")  # the features' model's folder
    inputs = load_report_inputs(model="tiny", cache_root=tmp_path)
    assert not [m for m in inputs.missing if m.startswith(("baselines", "probes"))]
    assert (
        inputs.baselines["rows"]
        == json.loads((root / "baselines" / "table.json").read_text())["rows"]
    )
    assert inputs.probes.resid.to_json() == saved["resid"].to_json()
    assert inputs.probes.sae.to_json() == saved["sae"].to_json()
    assert inputs.probes.probe.layer == 2 and sorted(inputs.probes.latents) == [2]
    assert inputs.probes.conditional.to_json() == saved["summary"]

    page = build_report(**inputs.kwargs())
    assert _script_srcs(page) == []
    assert _n_figures(page) == 2  # method comparison, probe quality by layer
    base = page[page.index("<h2>Baselines</h2>") : page.index("<h2>Functional features</h2>")]
    spare = results["spare"]
    assert "<th>EM_C, to context</th>" in base and "<th>extra passes / token</th>" in base
    ctx, mem = spare["steer_to_context"], spare["steer_to_memory"]
    assert f"<td>{ctx['EM_C']:.1f} ± {ctx['EM_C_std']:.1f}</td>" in base
    assert f"<td>{mem['EM_M']:.1f} ± {mem['EM_M_std']:.1f}</td>" in base
    t = spare["transitions"]["EM_C->M"]
    assert f"<td>{t['mean']:.1f} ± {t['std']:.1f}</td>" in base
    assert "<td class='left'>icl *</td>" in base and "<code>cache_data/&lt;model&gt;" in base
    assert "|---" not in base and "\\*" not in base
    assert "Steering methods compared" in base

    probes = page[page.index("<h2>Detecting the conflict</h2>") :]
    assert "Knowledge-conflict probes" in probes
    assert "<td>3 (best residual) (best SAE)</td>" in probes
    layer3 = saved["resid"].layers[3]
    assert f"{layer3.auroc_mean:.3f} ± {layer3.auroc_std:.3f}" in probes
    assert "Deployed probe: layer 2" in probes
    # latents: top 3 by weight 5, 3 (C), 9 (M); overlaps with the functional features
    assert "<td>[3] / [9]</td>" in probes and "<td>[3] / []</td>" in probes
    assert "5, 3 (C), 9 (M)" in probes
    lat = saved["latents"][2]
    assert f"<td>{lat.expected_overlap(3):.2f}</td>" in probes
    assert "<td class='left'>steer when the probe flags a conflict</td>" in probes
    assert "<td>41.0 ± 1.5</td>" in probes and "flags 90.0 % of conflict rows" in probes
    assert probes.count("(best residual)") == 1  # the probe table is not repeated


def test_report_baselines_from_method_results_without_table(tmp_path):
    directory = tmp_path / "baselines"
    results = write_baselines(directory)
    (directory / "table.json").unlink()
    inputs = load_report_inputs(
        features=tmp_path,
        statistics=tmp_path,
        results=[tmp_path],
        grouped=tmp_path,
        baselines=directory,
        probes=tmp_path / "no-probes",
        scan=tmp_path / "no-scan",
    )
    assert list(inputs.baselines) == sorted(results)  # not sweep-cad.json nor predictions
    assert inputs.baselines["cad"] == results["cad"]
    page = build_report(**inputs.kwargs())
    assert "<td class='left'>cad</td>" in page and _n_figures(page) == 1


def test_report_says_when_baselines_and_probes_are_absent(tmp_path):
    from types import SimpleNamespace

    from spare_tl.studies.probes import ConditionalResult

    saved = write_probes(tmp_path / "probes", with_sae=False)
    for name in ("latents.json", "conditional/results.json"):
        (tmp_path / "probes" / name).unlink()
    inputs = load_report_inputs(
        features=tmp_path,
        statistics=tmp_path,
        results=[tmp_path],
        grouped=tmp_path,
        scan=tmp_path / "no-scan",
        baselines=tmp_path / "none",
        probes=tmp_path / "probes",
    )
    assert inputs.baselines is None and inputs.probes.resid is not None
    joined = "\n".join(inputs.missing)
    assert f"baselines: none in {tmp_path / 'none'}" in joined
    for part in ("sae/results.json", "latents.json", "conditional/results.json"):
        assert f"probes: no {part}" in joined
    page = build_report(**inputs.kwargs())
    assert "No baselines" in page and "No conflict latents" in page
    assert "No conditional steering results" in page
    assert _n_figures(page) == 1 and "(best residual)" in page
    # nothing at all: both sections say so, and the box lists them
    empty = load_report_inputs(
        baselines=tmp_path / "a", probes=tmp_path / "b", model="none", cache_root=tmp_path
    )
    assert empty.baselines is None and empty.probes is None
    page = build_report(**empty.kwargs())
    assert "No baselines" in page and "No conflict probes" in page
    assert "probes (detecting the conflict): none in" in page
    # objects instead of files: a ProbeStudy's attributes (ConflictLatents, not their JSON)
    study = SimpleNamespace(
        resid=saved["resid"],
        sae=None,
        probe=None,
        latents=saved["latents"],
        conditional=ConditionalResult(saved["summary"]),
    )
    page = build_report(probes=study)
    assert "<td>[3] / [9]</td>" in page and "flags 90.0 % of conflict rows" in page
    assert "Deployed probe" not in page and _n_figures(page) == 1


def test_report_cli_baselines_and_probes(tmp_path, capsys):
    from spare_tl.cli import main

    write_baselines(tmp_path / "b")
    write_probes(tmp_path / "p")
    out = tmp_path / "r.html"
    none = str(tmp_path / "none")
    rc = main(
        [
            "report",
            "--features",
            none,
            "--statistics",
            none,
            "--results",
            none,
            "--grouped",
            none,
            "--baselines",
            str(tmp_path / "b"),
            "--probes",
            str(tmp_path / "p"),
            "--scan",
            none,
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "missing: baselines" not in printed and "missing: probes" not in printed
    page = out.read_text()
    assert "<h2>Baselines</h2>" in page and "Steering only on a detected conflict" in page
    assert _n_figures(page) == 2
