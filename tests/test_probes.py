"""Knowledge-conflict probes and conditional steering, on tiny models and synthetic data."""

from __future__ import annotations

import argparse

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from spare_tl.cli import probes as cli_probes
from spare_tl.data.schema import ConflictItem
from spare_tl.features import FunctionalFeatures, LayerFeatures
from spare_tl.generation import greedy_generate
from spare_tl.layer_spec import parse_layers
from spare_tl.methods.conflict_probe import ConflictProbe
from spare_tl.methods.spare import resid_post_hook_name, steer
from spare_tl.studies import probe_data
from spare_tl.studies import probes as P
from spare_tl.studies.probe_data import (
    ProbeDataset,
    build_probe_dataset,
    probe_prompts,
    split_by_question,
)
from spare_tl.studies.probe_training import (
    DEFAULT_CS,
    LayerProbeScores,
    ProbeResults,
    conflict_latents,
    fit_conflict_probe,
    train_probes,
)
from spare_tl.studies.probes import evaluate_conditional, run_probe_study
from spare_tl.testing import tiny_model, tiny_sae
from spare_tl.viz import probe_quality_by_layer

D_MODEL, D_SAE = 32, 128
EDIT_LAYERS = (1, 2)
PROMPTS = ["hello world", "the cat sat on", "a", "question: who?\nanswer:"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def make_items(n: int, start: int = 0) -> list[ConflictItem]:
    return [
        ConflictItem(
            question=f"where is x{i}?",
            org_context=f"x{i} is in m{i}.",
            org_answer=(f"m{i}",),
            sub_context=f"x{i} is in c{i}.",
            sub_answer=(f"c{i}",),
            relation="r",
        )
        for i in range(start, start + n)
    ]


def make_features(layers=EDIT_LAYERS, edit_strength: float = 3.0) -> FunctionalFeatures:
    per_layer = {}
    for layer in layers:
        g = torch.Generator().manual_seed(layer)
        ids = torch.randperm(D_SAE, generator=g)
        per_layer[layer] = LayerFeatures(
            layer=layer,
            hook_name=resid_post_hook_name(layer),
            context_features=ids[:6],
            memory_features=ids[6:12],
            context_activations=torch.rand(D_SAE, generator=g) * 2,
            memory_activations=torch.rand(D_SAE, generator=g) * 2,
        )
    return FunctionalFeatures(
        model_name="tiny-llama", layers=per_layer, proportion=0.1, edit_strength=edit_strength
    )


def make_saes(layers=EDIT_LAYERS) -> dict:
    return {layer: tiny_sae(resid_post_hook_name(layer), seed=layer) for layer in layers}


def constant_probe(flag: bool, layer: int = 1) -> ConflictProbe:
    return ConflictProbe(
        layer=layer,
        weight=torch.zeros(D_MODEL),
        bias=10.0 if flag else -10.0,
        mean=torch.zeros(D_MODEL),
        scale=torch.ones(D_MODEL),
    )


def planted_dataset(
    n_questions: int = 60, d: int = 16, signal_layer: int = 2, noise_layer: int = 1, seed: int = 0
) -> ProbeDataset:
    """Two rows per question (conflict, no conflict) sharing a per-question offset; the label
    is linearly readable at ``signal_layer`` only."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0] * n_questions)
    qids = torch.arange(n_questions).repeat_interleave(2)
    offset = torch.randn(n_questions, d, generator=g)[qids]
    direction = torch.zeros(d)
    direction[0] = 1.0
    signal = offset + 0.3 * torch.randn(2 * n_questions, d, generator=g)
    signal = signal + (2.0 * labels[:, None] - 1.0) * 2.0 * direction
    noise = offset + torch.randn(2 * n_questions, d, generator=g)
    return ProbeDataset(
        model_name="synthetic",
        resid={noise_layer: noise, signal_layer: signal},
        codes={},
        labels=labels,
        question_ids=qids,
        item_ids=qids.clone(),
        questions=[f"q{i}" for i in range(n_questions)],
        config={"synthetic": seed},
    )


# ---------------------------------------------------------------------------- probing data


def test_probe_prompts_pair_conflict_and_consistent_with_the_same_demonstrations():
    items, pool = make_items(5), make_items(4, start=100)
    data = probe_prompts(items, pool, n_shots=2, seed=3, n_demo_sets=2)
    assert len(data.prompts) == 2 * 5 * 2
    assert data.labels.tolist() == [1, 0] * 10
    assert data.question_ids.tolist() == [q for q in range(5) for _ in (0, 1)] * 2
    for j in range(0, len(data.prompts), 2):
        conflict, consistent = data.prompts[j], data.prompts[j + 1]
        head_c, _, tail_c = conflict.rpartition("context: ")
        head_n, _, tail_n = consistent.rpartition("context: ")
        assert head_c == head_n and head_c.count("answer:") == 2  # same two demonstrations
        item = items[int(data.item_ids[j])]
        assert tail_c.startswith(item.sub_context) and tail_n.startswith(item.org_context)
    # demonstration set 2 uses other demonstrations than set 1 (for some item)
    first, second = data.prompts[:10], data.prompts[10:]
    assert first != second


def test_build_probe_dataset_shapes_codes_and_cache(model, tmp_path, monkeypatch):
    items, pool = make_items(6), make_items(3, start=100)
    saes = {1: tiny_sae("blocks.1.hook_resid_post", seed=1)}
    kwargs = dict(n_shots=1, saes=saes, cache_root=tmp_path, progress=False)
    ds = build_probe_dataset(model, items, pool, [2, 1], **kwargs)
    assert ds.layers == [1, 2] and ds.sae_layers == [1] and len(ds) == 12
    assert ds.resid[2].shape == (12, D_MODEL) and ds.codes[1].shape == (12, D_SAE)
    assert ds.codes[1].dtype == torch.float16 and ds.features(1, "sae").dtype == torch.float32
    assert ds.labels.tolist() == [1, 0] * 6 and len(ds.questions) == 6
    # the residual is the last prompt position of blocks.{l}.hook_resid_post
    prompt = probe_prompts(items, pool, n_shots=1).prompts[3]
    _, store = model.run_with_cache(prompt, names_filter=resid_post_hook_name(2))
    torch.testing.assert_close(ds.resid[2][3], store[resid_post_hook_name(2)][0, -1])
    expected = saes[1].encode(ds.resid[1]).half()
    torch.testing.assert_close(ds.codes[1], expected, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="no SAE codes for layer 2"):
        ds.features(2, "sae")

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(probe_data, "last_position_resid", boom)
    again = build_probe_dataset(model, items, pool, [1, 2], **kwargs)
    for layer in (1, 2):
        assert torch.equal(again.resid[layer], ds.resid[layer])
    assert torch.equal(again.codes[1], ds.codes[1])
    assert torch.equal(again.question_ids, ds.question_ids) and again.questions == ds.questions
    with pytest.raises(AssertionError, match="recomputed"):  # another config is not fresh
        build_probe_dataset(model, items, pool, [1, 2], **kwargs | {"seed": 1})


def test_split_by_question_keeps_questions_on_one_side():
    qids = torch.arange(20).repeat_interleave(3)
    seen_tests = set()
    for seed in range(4):
        train, test = split_by_question(qids, 0.25, seed)
        assert set(qids[train].tolist()).isdisjoint(qids[test].tolist())
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(60))
        assert len(set(qids[test].tolist())) == 5
        seen_tests.add(tuple(sorted(set(qids[test].tolist()))))
    assert len(seen_tests) > 1
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_question(qids, 1.0, 0)
    with pytest.raises(ValueError, match="2 distinct"):
        split_by_question(torch.zeros(4, dtype=torch.long), 0.5, 0)


# ---------------------------------------------------------------------------- probes


def test_probe_learns_a_planted_signal_and_is_at_chance_on_noise(tmp_path):
    ds = planted_dataset()
    results = train_probes(ds, seeds=(0, 1), progress=False)
    signal, noise = results.layers[2], results.layers[1]
    assert signal.auroc_mean > 0.99 and signal.accuracy_mean > 0.95
    assert abs(noise.auroc_mean - 0.5) < 0.2 and abs(noise.accuracy_mean - 0.5) < 0.2
    assert len(signal.auroc) == 2 and all(c in DEFAULT_CS for c in signal.C)
    assert results.best_layer() == 2 and results.best_layer(max_layer=1) == 1
    with pytest.raises(ValueError, match="<= 0"):
        results.best_layer(max_layer=0)
    fixed = train_probes(ds, seeds=(0,), C=0.5, layers=[2], progress=False)
    assert fixed.layers[2].C == [0.5] and list(fixed.layers) == [2]
    results.save(tmp_path / "r.json")
    loaded = ProbeResults.load(tmp_path / "r.json")
    assert loaded.to_json() == results.to_json()
    with pytest.raises(ValueError, match="no SAE codes"):
        train_probes(ds, features="sae", progress=False)


def test_conflict_probe_predicts_and_round_trips(tmp_path):
    ds = planted_dataset()
    probe = fit_conflict_probe(ds, 2)
    x = ds.features(2)
    assert (probe.predict(x).long() == ds.labels).float().mean() > 0.95
    assert probe.predict(x[0]).shape == () and probe.logits(x[None]).shape == (1, len(ds))
    probe.save(tmp_path)
    loaded = ConflictProbe.load(tmp_path)
    assert loaded.layer == 2 and loaded.bias == probe.bias and loaded.C == probe.C
    for name in ("weight", "mean", "scale"):
        assert torch.equal(getattr(loaded, name), getattr(probe, name))
    assert torch.equal(loaded.predict(x), probe.predict(x))
    strict = ConflictProbe(**{**loaded.__dict__, "threshold": 0.99})
    assert strict.predict(x).sum() <= probe.predict(x).sum()
    with pytest.raises(ValueError, match="width"):
        probe.predict(torch.zeros(3, 5))


def test_conflict_latents_rank_planted_latents_and_overlap_with_features():
    ds = planted_dataset(n_questions=40)
    g = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(len(ds), 64, generator=g))
    codes[:, 50:] = 0.0  # dead latents
    codes[ds.labels == 1, 3] += 1.0  # conflict raises latent 3 ...
    codes[ds.labels == 0, 7] += 1.0  # ... and lowers latent 7 (each alone is not enough)
    ds.codes = {2: codes.half()}
    feats = FunctionalFeatures(
        model_name="synthetic",
        layers={
            2: LayerFeatures(
                layer=2,
                hook_name=resid_post_hook_name(2),
                context_features=torch.tensor([3, 11]),
                memory_features=torch.tensor([7, 20]),
                context_activations=torch.rand(64),
                memory_activations=torch.rand(64),
            )
        },
        proportion=0.1,
    )
    lat = conflict_latents(ds, 2, feats, top_n=5)
    assert set(lat.top_by_mutual_information[:2]) == {3, 7}
    assert set(lat.top_by_weight[:2]) == {3, 7}
    assert lat.weight[3] > 0 > lat.weight[7] and lat.expectation[3] > 0 > lat.expectation[7]
    assert lat.n_active == 50
    ov = lat.overlap()
    assert ov["weight&context"] == [3] and ov["weight&memory"] == [7]
    assert ov["mutual_information&context"] == [3]
    data = lat.to_json()
    assert data["top_by_mutual_information"][0]["latent"] in (3, 7)
    assert data["context_features"][0]["mutual_information_rank"] <= 2
    assert data["expected_overlap_by_chance"] == pytest.approx(5 * 4 / 50)


# ---------------------------------------------------------------------------- steering


def _hooks(model, layer):
    return model.hook_dict[resid_post_hook_name(layer)].fwd_hooks


def _last_resid(model, tokens, layer):
    _, store = model.run_with_cache(tokens, names_filter=resid_post_hook_name(layer))
    return store[resid_post_hook_name(layer)][:, -1]


def mixed_probe(x: torch.Tensor, layer: int = 1, n_flagged: int = 2) -> tuple[ConflictProbe, list]:
    """A probe that flags exactly ``n_flagged`` of the residuals ``x``, with a wide margin."""
    w = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5))
    s = x @ w
    order = torch.argsort(s, descending=True)
    cut = float(s[order[n_flagged - 1]] + s[order[n_flagged]]) / 2
    margin = float(s[order[n_flagged - 1]] - s[order[n_flagged]]) / 2
    assert margin > 1e-2
    probe = ConflictProbe(
        layer=layer, weight=w, bias=-cut, mean=torch.zeros(D_MODEL), scale=torch.ones(D_MODEL)
    )
    return probe, (s > cut).tolist()


def test_conditional_steering_flagging_nothing_or_everything(model):
    features, saes = make_features(), make_saes()
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    gen = dict(max_new_tokens=6, stop_at_newline=False, progress=False, batch_size=4)
    base, base_text = model(tokens), greedy_generate(model, PROMPTS, **gen)
    with steer(model, features, "memory", saes):
        always, always_text = model(tokens), greedy_generate(model, PROMPTS, **gen)
    assert not torch.equal(always, base)
    never = constant_probe(False)
    with steer(model, features, "memory", saes, when="conflict", probe=never) as s:
        assert torch.equal(model(tokens), base)
        assert greedy_generate(model, PROMPTS, **gen) == base_text
    assert s.gate.stats.flagged == 0 and s.gate.stats.rows > 0
    assert all(h.stats.rows_edited == 0 for h in s.hooks.values())
    with steer(model, features, "memory", saes, when="conflict", probe=constant_probe(True)) as s:
        assert torch.equal(model(tokens), always)
        assert greedy_generate(model, PROMPTS, **gen) == always_text
    assert s.gate.stats.flagged == s.gate.stats.rows
    assert not _hooks(model, 1) and not _hooks(model, 2)


def test_conditional_steering_edits_only_flagged_rows(model):
    features, saes = make_features(), make_saes()
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    probe, flags = mixed_probe(_last_resid(model, tokens, 1))
    base = model(tokens)
    with steer(model, features, "context", saes):
        always = model(tokens)
    with steer(model, features, "context", saes, when="conflict", probe=probe) as s:
        mixed = model(tokens)
    assert sum(flags) == 2 and s.gate.flags.tolist() == flags
    assert {h.stats.rows_edited for h in s.hooks.values()} == {2}
    for i, flagged in enumerate(flags):
        if flagged:
            assert not torch.equal(mixed[i], base[i])
            torch.testing.assert_close(mixed[i], always[i], atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(mixed[i], base[i])


def test_conditional_generation_batch_equals_single_and_cache_on_equals_off(model):
    """KV-cache steps are left alone, and re-runs without the cache keep the prompt's flags."""
    features, saes = make_features(), make_saes()
    singles_resid = torch.cat([_last_resid(model, model.to_tokens(p), 1) for p in PROMPTS])
    probe, _ = mixed_probe(singles_resid)
    kwargs = dict(max_new_tokens=6, stop_at_newline=False, progress=False)
    gen = dict(max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens")
    with steer(model, features, "context", saes, when="conflict", probe=probe) as s:
        batched = greedy_generate(model, PROMPTS, batch_size=4, **kwargs)
        singles, flags = [], []
        for p in PROMPTS:
            singles += greedy_generate(model, [p], batch_size=1, **kwargs)
            flags.append(bool(s.gate.flags[0]))
        cached = model.generate(PROMPTS, **gen)
        uncached = model.generate(PROMPTS, use_past_kv_cache=False, **gen)
    assert batched == singles and torch.equal(cached, uncached)
    unsteered = [greedy_generate(model, [p], batch_size=1, **kwargs)[0] for p in PROMPTS]
    with steer(model, features, "context", saes):
        steered = [greedy_generate(model, [p], batch_size=1, **kwargs)[0] for p in PROMPTS]
    assert any(flags) and not all(flags)
    for i, flagged in enumerate(flags):
        assert singles[i] == (steered[i] if flagged else unsteered[i])


def test_probe_at_the_first_edited_layer_reads_the_unedited_residual(model):
    features, saes = make_features(), make_saes()
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    seen = []

    class Recording(ConflictProbe):
        def predict(self, resid):
            seen.append(resid.clone())
            return super().predict(resid)

    probe = Recording(**constant_probe(True, layer=1).__dict__)
    with steer(model, features, "context", saes, when="conflict", probe=probe):
        model(tokens)
    assert len(seen) == 1 and torch.equal(seen[0], _last_resid(model, tokens, 1))


def test_conditional_steering_errors_leave_no_hooks(model):
    features, saes = make_features(), make_saes()
    cases = [
        (dict(when="conflict"), "needs probe"),
        (dict(probe=constant_probe(True)), "only used with when='conflict'"),
        (dict(when="sometimes"), "when must be"),
        (dict(when="conflict", probe=constant_probe(True, layer=2)), "first edited layer"),
        (dict(when="conflict", probe=constant_probe(True, layer=9)), "outside"),
    ]
    wide = ConflictProbe(1, torch.zeros(16), 0.0, torch.zeros(16), torch.ones(16))
    cases.append((dict(when="conflict", probe=wide), "d_model"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            with steer(model, features, "memory", saes, **kwargs):
                pass
        assert not _hooks(model, 1) and not _hooks(model, 2)
    # a probe at layer 2 is fine when only layer 2 is edited
    with steer(model, features, "memory", saes, layers=[2], when="conflict",
               probe=constant_probe(True, layer=2)) as s:  # fmt: skip
        assert len(_hooks(model, 2)) == 2 and s.gate is not None
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, features, "memory", saes, when="conflict", probe=constant_probe(True)):
            assert len(_hooks(model, 1)) == 2
            raise RuntimeError("boom")
    assert not _hooks(model, 1) and not _hooks(model, 2)


# ---------------------------------------------------------------------------- evaluation


def test_evaluate_conditional_on_a_mixed_set(model):
    features, saes = make_features(), make_saes()
    items, pool = make_items(3), make_items(4, start=100)
    kwargs = dict(seeds=(0,), n_shots=1, max_new_tokens=4, progress=False)
    never = evaluate_conditional(
        model, features, saes, constant_probe(False), items, pool, **kwargs
    )
    data = never.to_json()
    for rt in ("conflict", "no_conflict"):
        for metric in ("EM_M", "EM_C", "neither"):
            assert data[rt]["steer_on_conflict"][metric] == data[rt]["no_steering"][metric]
    assert data["probe_on_eval"]["flagged_conflict"] == 0.0
    assert data["checks"]["no_conflict_within_2_points"] is True
    assert len(never.predictions) == 2 * len(items)
    rows = never.predictions
    assert all(r["steer_on_conflict.prediction"] == r["no_steering.prediction"] for r in rows)
    always = evaluate_conditional(
        model, features, saes, constant_probe(True), items, pool, **kwargs
    )
    assert all(
        r["steer_on_conflict.prediction"] == r["steer_always.prediction"]
        for r in always.predictions
    )
    assert always.to_json()["probe_on_eval"]["gate_flagged"] == 2 * len(items)
    with pytest.raises(ValueError, match="pool questions"):
        evaluate_conditional(model, features, saes, constant_probe(True), pool, pool, **kwargs)
    with pytest.raises(ValueError, match="first edited layer"):
        evaluate_conditional(
            model, features, saes, constant_probe(True, layer=3), items, pool, **kwargs
        )


def test_run_probe_study_end_to_end_and_from_its_cache(model, tmp_path, monkeypatch):
    features, saes = make_features(), make_saes()
    pool, evaluation = make_items(12, start=100), make_items(2)
    kwargs = dict(
        layers=[0, 1, 2],
        seeds=(0, 1),
        n_shots=1,
        top_n=5,
        n_items=2,
        eval_seeds=(0,),
        cache_root=tmp_path,
        progress=False,
    )
    study = run_probe_study(model, features, saes, pool, evaluation, **kwargs)
    out = tmp_path / "tiny-llama" / "probes"
    assert study.directory == out
    for path in (
        "dataset/config.json",
        "resid/results.json",
        "sae/results.json",
        "conflict_probe/conflict_probe.safetensors",
        "latents.json",
        "conditional/results.json",
        "conditional/predictions.jsonl",
    ):
        assert (out / path).exists(), path
    assert sorted(study.resid.layers) == [0, 1, 2] and sorted(study.sae.layers) == [1, 2]
    assert study.probe.layer <= 1 and sorted(study.latents) == [1, 2]
    table = cli_probes.study_table(study)
    assert "| layer | residual accuracy" in table and "steer when the probe flags" in table
    assert "Deployed probe: layer" in table

    def boom(*args, **kwargs):
        raise AssertionError("not cached")

    monkeypatch.setattr(P, "evaluate_conditional", boom)
    monkeypatch.setattr(P, "train_probes", boom)
    again = run_probe_study(model, features, saes, pool, evaluation, **kwargs)
    assert cli_probes.study_table(again) == table


def test_parse_layers_and_cli_arguments():
    assert parse_layers(["6-9"]) == [6, 7, 8, 9]
    assert parse_layers(["3", "1,2", "5-6"]) == [1, 2, 3, 5, 6]
    for bad in (["x"], ["5-3"], []):
        with pytest.raises(ValueError):
            parse_layers(bad)
    parser = argparse.ArgumentParser(prog="spare-tl")
    cli_probes.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["probes", "--layers", "6-20", "--n-items", "10"])
    assert args.func is cli_probes._run and args.command == "probes"
    assert args.layers == ["6-20"] and args.n_items == 10 and args.direction == "memory"
    assert args.seeds == [0, 1, 2, 3, 4] and args.dtype == "auto"
    spaced = parser.parse_args(["probes", "--layers", "6", "8", "--eval-seeds", "0"])
    assert spaced.layers == ["6", "8"] and spaced.eval_seeds == [0]
    with pytest.raises(SystemExit):  # the old `probes run` spelling is gone
        parser.parse_args(["probes", "run", "--layers", "6"])


def test_the_study_module_re_exports_the_library_names():
    for name in P.__all__:
        assert hasattr(P, name), name
    assert P.ConflictProbe is ConflictProbe and P.ProbeResults is ProbeResults
    assert P.build_probe_dataset is build_probe_dataset and P.parse_layers is parse_layers


# ---------------------------------------------------------------------------- figure


def test_probe_quality_figure_structure():
    resid = ProbeResults(
        features="resid",
        model_name="synthetic",
        layers={
            k: LayerProbeScores(k, [0.5, 0.6 * k], [0.55, 0.45 * k], [0.1, 0.1], [3, 4])
            for k in (1, 2)
        },
    )
    sae = ProbeResults.from_json({**resid.to_json(), "features": "sae"})
    sae.layers.pop(1)
    fig = probe_quality_by_layer(resid, sae.to_json())
    assert isinstance(fig, go.Figure) and len(fig.data) == 4
    assert all(isinstance(t, go.Scatter) for t in fig.data)
    r_acc, r_auc, s_acc, s_auc = fig.data
    assert list(r_acc.x) == [1, 2] and list(s_auc.x) == [2]
    assert list(r_acc.y) == [resid.layers[k].accuracy_mean for k in (1, 2)]
    assert list(r_auc.y) == [resid.layers[k].auroc_mean for k in (1, 2)]
    assert list(r_auc.error_y.array) == [resid.layers[k].auroc_std for k in (1, 2)]
    assert list(s_acc.y) == [resid.layers[2].accuracy_mean]
    assert "residual" in r_acc.name and "SAE" in s_acc.name
    assert [t.showlegend for t in fig.data] == [True, False, True, False]
    layout = fig.layout
    assert layout.xaxis.title.text == "layer" and layout.xaxis2.title.text == "layer"
    assert layout.yaxis.title.text == "accuracy" and layout.yaxis2.title.text == "AUROC"
    assert layout.title.text
    only = probe_quality_by_layer(resid)
    assert len(only.data) == 2


def test_probe_items_add_held_out_questions_disjoint_from_the_steering_items(model, tmp_path):
    features, saes = make_features(), make_saes()
    pool, evaluation = make_items(12, start=100), make_items(3)
    kwargs = dict(layers=[0, 1], seeds=(0,), n_shots=1, top_n=5, cache_root=tmp_path)
    with pytest.raises(ValueError, match="exceed the 3 held-out questions"):
        run_probe_study(model, features, saes, pool, evaluation, n_items=2, probe_items=2, **kwargs)
    study = run_probe_study(
        model,
        features,
        saes,
        pool,
        evaluation,
        n_items=1,
        probe_items=2,
        conditional=False,
        progress=False,
        **kwargs,
    )
    asked = set(study.dataset.questions)
    assert {it.question for it in pool} <= asked
    assert {it.question for it in evaluation[-2:]} <= asked  # the last two held-out items
    assert evaluation[0].question not in asked  # the conditional-steering item stays unseen
