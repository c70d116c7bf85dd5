"""Every SpARE stage on a tiny random model and SAEs (fast)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spare_tl.data.schema import ConflictItem
from spare_tl.features import DirectionSetting, FunctionalFeatures, select_functional_features
from spare_tl.methods.spare import steer
from spare_tl.stages import behaviours as behaviours_mod
from spare_tl.stages.activations import collect_activations, last_position_resid
from spare_tl.stages.behaviours import (
    BehaviourConfig,
    GroupedPrompts,
    group_prompts,
    require_groups,
)
from spare_tl.stages.evaluation import EvaluationConfig, evaluate
from spare_tl.stages.selection import functional_features
from spare_tl.stages.statistics import feature_statistics
from spare_tl.testing import tiny_sae


def _items(n: int) -> list[ConflictItem]:
    return [
        ConflictItem(
            question=f"what is thing {i}?",
            org_context=f"Thing {i} is m{i}.",
            org_answer=(f"m{i}",),
            sub_context=f"Thing {i} is c{i}.",
            sub_answer=(f"c{i}",),
            relation="r" + str(i % 2),
        )
        for i in range(n)
    ]


def _synthetic_grouped(model_name: str, n: int = 24) -> GroupedPrompts:
    records = []
    for i, it in enumerate(_items(n)):
        records.append(
            {
                "prompt": f"context: {it.sub_context}\nquestion: {it.question}\nanswer:"
                + " x" * (i % 3),
                "label": ["context", "memory", "neither"][i % 3],
                "demo_type": "dss",
                "shots": 1,
                "nll_context": 1.0 + i % 2,
                "nll_memory": 2.0,
            }
        )
    return GroupedPrompts(model_name, records, {"model": model_name})


def test_group_prompts_records_and_resume(tiny_model, tmp_path, monkeypatch):
    pool = _items(6)
    config = BehaviourConfig(shots=(1, 2), seeds=(0,), demo_types=("dss", "dso"), max_new_tokens=3)
    calls = {"n": 0}
    real = behaviours_mod.generate_and_score

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(behaviours_mod, "generate_and_score", flaky)
    with pytest.raises(KeyboardInterrupt):
        group_prompts(tiny_model, pool, config, cache_root=tmp_path, progress=False)
    calls["n"] = 100  # no more failures; count the units the resumed run still does
    resumed = group_prompts(tiny_model, pool, config, cache_root=tmp_path, progress=False)
    assert calls["n"] == 100 + 2  # 2 of the 4 units were already done
    assert len(resumed.records) == 4 * len(pool)
    monkeypatch.setattr(behaviours_mod, "generate_and_score", real)
    fresh = group_prompts(tiny_model, pool, config, use_cache=False, progress=False)
    key = lambda r: (r["unit"], r["pool_index"])  # noqa: E731
    assert sorted(map(key, resumed.records)) == sorted(map(key, fresh.records))
    by_key = {key(r): r for r in fresh.records}
    for r in resumed.records:
        assert r["prediction"] == by_key[key(r)]["prediction"]
        assert r["label"] in ("context", "memory", "neither")
        assert r["question"] not in r["demonstrations"]
    # a finished stage is served from the cache without generating
    monkeypatch.setattr(behaviours_mod, "generate_and_score", None)
    again = group_prompts(tiny_model, pool, config, cache_root=tmp_path, progress=False)
    assert len(again.records) == len(resumed.records)
    assert {row["demo_type"] for row in again.table()} == {"dss", "dso"}


def test_an_old_grouped_prompts_folder_is_moved_to_behaviours_and_not_recomputed(
    tiny_model, tmp_path, monkeypatch
):
    """A cache written when the stage's folder was ``grouped_prompts/``: the stage moves it to
    ``behaviours/`` (config and data byte-identical) and serves it without generating; the
    activations made from it are found too."""
    from spare_tl.stages.migrations import rename_stage_folder

    def answers(model, prompts, candidates, **kwargs):  # context, memory, context, ...
        out = [pair[i % 2] for i, pair in enumerate(candidates)]
        return out, torch.ones(len(prompts), 2, dtype=torch.float64)

    monkeypatch.setattr(behaviours_mod, "generate_and_score", answers)
    pool = _items(5)
    config = BehaviourConfig(shots=(1,), seeds=(0,), demo_types=("dss", "dso"), max_new_tokens=3)
    made = group_prompts(tiny_model, pool, config, cache_root=tmp_path, progress=False)
    model_dir = tmp_path / "tiny-llama"
    acts = collect_activations(tiny_model, made, [1], cache_root=tmp_path, progress=False)
    (model_dir / "behaviours").rename(model_dir / "grouped_prompts")  # the old layout
    before = {p.name: p.read_bytes() for p in (model_dir / "grouped_prompts").iterdir()}
    monkeypatch.setattr(behaviours_mod, "generate_and_score", None)  # any generation fails
    again = group_prompts(tiny_model, pool, config, cache_root=tmp_path, progress=False)
    assert not (model_dir / "grouped_prompts").exists()
    after = {p.name: p.read_bytes() for p in (model_dir / "behaviours").iterdir()}
    assert after == before and again.records == made.records
    monkeypatch.setattr(
        "spare_tl.stages.activations.last_position_resid",
        lambda *a, **k: pytest.fail("the activations were recomputed"),
    )
    cached = collect_activations(tiny_model, again, [1], cache_root=tmp_path, progress=False)
    assert torch.equal(cached.resid[1], acts.resid[1])
    # both folders: the new one is used and the old one left alone
    (model_dir / "grouped_prompts").mkdir()
    assert (
        rename_stage_folder(model_dir, "grouped_prompts", "behaviours") == model_dir / "behaviours"
    )
    assert (model_dir / "grouped_prompts").is_dir()


def test_empty_group_is_a_clear_error():
    grouped = GroupedPrompts("m", [{"label": "context"}] * 5 + [{"label": "neither"}] * 3)
    with pytest.raises(ValueError, match=r"\['memory'\].*dso"):
        require_groups(grouped)


def test_last_position_residual_is_the_unpadded_one(tiny_model):
    prompts = ["context: a\nquestion: b?\nanswer:", "hi"]
    resid = last_position_resid(tiny_model, prompts, [0, 2], batch_size=2, progress=False)
    for i, p in enumerate(prompts):
        _, c = tiny_model.run_with_cache(p, names_filter="blocks.2.hook_resid_post")
        assert torch.allclose(resid[2][i], c["blocks.2.hook_resid_post"][0, -1], atol=1e-5)


def test_layer_beyond_the_model_is_refused(tiny_model):
    grouped = _synthetic_grouped("tiny-llama")
    with pytest.raises(ValueError, match="outside tiny-llama, which has 4 layers"):
        collect_activations(tiny_model, grouped, [1, 9], use_cache=False, progress=False)


def test_activations_and_statistics_are_cached_per_model_dtype(tiny_model, tmp_path):
    """A bf16 run's activations (and the statistics on them) are never reused by an fp32 run."""
    import copy

    from sae_lens import HookedSAETransformer

    grouped = _synthetic_grouped("tiny-llama")
    saes = {1: tiny_sae("blocks.1.hook_resid_post", k=16)}
    fp32 = collect_activations(tiny_model, grouped, [1], cache_root=tmp_path, progress=False)
    stats32 = feature_statistics(tiny_model, fp32, saes, cache_root=tmp_path, progress=False)
    cfg = copy.deepcopy(tiny_model.cfg)
    cfg.dtype = torch.bfloat16
    bf16_model = HookedSAETransformer(cfg, tokenizer=tiny_model.tokenizer)
    bf16_model.load_state_dict(
        {k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items()}
    )
    assert bf16_model.cfg.dtype == torch.bfloat16
    bf16 = collect_activations(bf16_model, grouped, [1], cache_root=tmp_path, progress=False)
    assert bf16.config["dtype"] == "torch.bfloat16" and not torch.equal(
        bf16.resid[1], fp32.resid[1]
    )
    stats16 = feature_statistics(bf16_model, bf16, saes, cache_root=tmp_path, progress=False)
    assert not torch.equal(stats16[1].context_activations, stats32[1].context_activations)
    again = collect_activations(tiny_model, grouped, [1], cache_root=tmp_path, progress=False)
    assert again.config["dtype"] == "torch.float32" and torch.equal(again.resid[1], fp32.resid[1])


def test_statistics_and_features_end_to_end(tiny_model, tmp_path):
    grouped = _synthetic_grouped("tiny-llama")
    acts = collect_activations(tiny_model, grouped, [1, 2], cache_root=tmp_path, progress=False)
    assert acts.resid[1].shape == (16, 32)  # 24 prompts, a third dropped
    assert acts.labels.tolist().count(1) == 8
    saes = {layer: tiny_sae(f"blocks.{layer}.hook_resid_post", k=16) for layer in (1, 2)}
    stats = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)
    s = stats[1]
    codes = saes[1].encode(acts.resid[1])
    ctx = acts.labels == 1
    assert torch.allclose(s.expectation, codes[ctx].mean(0) - codes[~ctx].mean(0), atol=1e-5)
    w = acts.weights[ctx] / acts.weights[ctx].sum()
    assert torch.allclose(
        s.context_activations, (w[:, None].float() * codes[ctx]).sum(0), atol=1e-5
    )
    assert (s.mutual_information >= 0).all() and s.mutual_information.sum() > 0
    # cached: the second call reads the files
    again = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)
    assert torch.equal(again[1].mutual_information, s.mutual_information)
    feats = functional_features(
        stats, DirectionSetting(proportion=0.3, edit_strength=2.0), model_name="tiny-llama"
    )
    ctx_ids, mem_ids = select_functional_features(s.mutual_information, s.expectation, 0.3)
    assert torch.equal(feats.layers[1].context_features, ctx_ids)
    assert torch.equal(feats.layers[1].memory_features, mem_ids)
    feats.save(tmp_path / "features")
    loaded = FunctionalFeatures.load(tmp_path / "features")
    assert loaded.counts() == feats.counts() and loaded.edit_strength == 2.0


def test_selection_rule_on_a_hand_example():
    mi = torch.tensor([0.5, 0.1, 0.3, 0.0, 0.1])
    e = torch.tensor([1.0, -1.0, -2.0, 5.0, 0.0])
    # total 1.0; cumulative sorted [0.5, 0.8, 0.9, 1.0]: K=0.6 needs k=2 -> latents 0, 2
    ctx, mem = select_functional_features(mi, e, 0.6)
    assert ctx.tolist() == [0] and mem.tolist() == [2]
    ctx, mem = select_functional_features(mi, e, 1.0)
    assert sorted(ctx.tolist() + mem.tolist()) == [0, 1, 2, 3]  # K = 1: every latent with E != 0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="proportion K"):
            select_functional_features(mi, e, bad)


def test_a_direction_setting_is_checked_once_when_made():
    with pytest.raises(ValueError, match="α must be a finite number >= 0"):
        DirectionSetting(proportion=0.1, edit_strength=-1)
    with pytest.raises(ValueError, match="proportion K must be in"):
        DirectionSetting(proportion=float("nan"))
    with pytest.raises(ValueError, match="site must be one of"):
        DirectionSetting(site="hook_z")
    with pytest.raises(ValueError, match="selection must be one of"):
        DirectionSetting(selection="causal")
    with pytest.raises(ValueError, match="latent code"):
        DirectionSetting(latent_code="dense")
    with pytest.raises(ValueError, match="layer numbers"):
        DirectionSetting(layers=(1, -2))
    setting = DirectionSetting(layers=(3, 1, 3), proportion=1, edit_strength=2)
    assert setting.layers == (1, 3) and setting.record()["proportion"] == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        setting.edit_strength = 3.0  # type: ignore[misc]


def test_evaluate_both_directions(tiny_model, tmp_path):
    grouped = _synthetic_grouped("tiny-llama")
    acts = collect_activations(tiny_model, grouped, [1], cache_root=tmp_path, progress=False)
    saes = {1: tiny_sae("blocks.1.hook_resid_post", k=16)}
    stats = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)
    feats = functional_features(
        stats, DirectionSetting(proportion=0.5, edit_strength=3.0), model_name="tiny-llama"
    )
    items = _items(10)
    pool, evaluation = items[:5], items[5:]
    result = evaluate(
        tiny_model,
        evaluation,
        pool,
        features=feats,
        saes=saes,
        config=EvaluationConfig(seeds=(0, 1), n_shots=2, max_new_tokens=3),
        progress=False,
    )
    data = result.to_json()
    for cond in ("no_steering", "steer_to_context", "steer_to_memory"):
        assert set(data[cond]) >= {"EM_C", "EM_M", "per_seed"}
        assert len(data[cond]["per_seed"]["EM_C"]) == 2
    assert data["n_items"] == 5 and len(result.predictions) == 10
    assert set(data["per_relation"]) == {"r0", "r1"}
    with pytest.raises(ValueError, match="pool questions"):
        evaluate(tiny_model, pool, pool, features=feats, saes=saes, progress=False)


def test_sweep_on_the_development_set(tiny_model, tmp_path):
    from spare_tl.stages.sweep import best_settings, features_from_sweep, grid, save_sweep, sweep

    grouped = _synthetic_grouped("tiny-llama")
    acts = collect_activations(tiny_model, grouped, [1, 2], cache_root=tmp_path, progress=False)
    saes = {layer: tiny_sae(f"blocks.{layer}.hook_resid_post", k=16) for layer in (1, 2)}
    stats = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)
    pool = _items(8)
    dev = _items(12)[8:]
    settings = grid({"resid_post": [[1], [1, 2]]}, [0.2], [1.0, 4.0])
    records = sweep(tiny_model, stats, saes, dev, pool, settings, n_shots=2, progress=False)
    assert records[0]["direction"] == "none"
    assert len(records) == 1 + 2 * 1 * 2 * 2
    best = best_settings(records)
    assert set(best) == {"context", "memory"}
    assert best["memory"]["EM_M"] == max(r["EM_M"] for r in records if r["direction"] == "memory")
    save_sweep(records, tmp_path / "sweep", {"k": 1})
    assert (tmp_path / "sweep" / "sweep.json").exists()

    # the feature set of the best settings: one set when they agree, else one per direction
    def rec(direction, layers, k, alpha, em):
        return dict(direction=direction, layers=layers, proportion=k, edit_strength=alpha,
                    EM_C=em, EM_M=em, neither=0.0)  # fmt: skip

    same = [rec("none", [], 0, 0, 0), rec("context", [1], 0.2, 4.0, 50),
            rec("memory", [1], 0.2, 1.0, 50)]  # fmt: skip
    one = features_from_sweep(same, stats, "tiny-llama")
    assert one.to_memory is None and sorted(one.layers) == [1]
    assert one.strength("context") == 4.0 and one.strength("memory") == 1.0
    apart = [*same[:2], rec("memory", [1, 2], 0.5, 1.0, 60)]
    two = features_from_sweep(apart, stats, "tiny-llama")
    assert sorted(two.layers) == [1] and two.proportion == 0.2 and two.strength("context") == 4.0
    assert two.to_memory is not None and sorted(two.to_memory.layers) == [1, 2]
    assert two.to_memory.proportion == 0.5 and two.strength("memory") == 1.0
    with pytest.raises(ValueError, match="both directions"):
        features_from_sweep(same[:2], stats, "tiny-llama")


def test_windows_grid_neither_cap_and_oracle_shares():
    from spare_tl.stages.scan import ScanResult
    from spare_tl.stages.sweep import SweepPoint, best_settings, grid, oracle_shares, windows

    assert windows([19, 20, 21, 22], sizes=(2, 3)) == [
        (19, 20), (20, 21), (21, 22), (19, 20, 21), (20, 21, 22)
    ]  # fmt: skip
    assert windows([10, 11, 13, 14], sizes=(2,)) == [(10, 11), (13, 14)]  # no gaps inside
    assert windows(range(10, 18), sizes=(4,), stride=3) == [(10, 11, 12, 13), (13, 14, 15, 16)]
    settings = grid({"resid_post": [[20, 21]], "attn_out": [[22, 23]]}, [0.1], [2.0])
    assert len(settings) == 4 and {s.setting.site for s in settings} == {"resid_post", "attn_out"}
    assert list(settings[0].record()) == [
        "direction",
        "site",
        "layers",
        "proportion",
        "edit_strength",
        "selection",
    ]  # fmt: skip  (the sweep.json records' keys, in order)
    with pytest.raises(ValueError, match="direction"):
        SweepPoint("sideways", DirectionSetting(layers=(1,)))
    with pytest.raises(ValueError, match="at least one layer"):
        SweepPoint("memory", DirectionSetting())

    def rec(direction, site, layers, em_m, neither):
        return dict(direction=direction, site=site, layers=layers, proportion=0.1,
                    edit_strength=2.0, EM_C=0.0, EM_M=em_m, neither=neither)  # fmt: skip

    records = [rec("none", "", [], 10.0, 20.0), rec("memory", "resid_post", [20, 21], 50.0, 45.0),
               rec("memory", "attn_out", [22, 23], 40.0, 25.0)]  # fmt: skip
    assert best_settings(records)["memory"]["EM_M"] == 50.0  # no cap: the highest
    assert best_settings(records, 10.0)["memory"]["site"] == "attn_out"  # 45 > 20 + 10
    assert best_settings(records, 1.0)["memory"]["EM_M"] == 50.0  # none qualifies: highest
    scan = ScanResult(
        model_name="m", n_items=4, baseline={"EM_C": 50.0, "EM_M": 10.0, "neither": 40.0},
        donors={}, rows=[
            {"direction": "memory", "site": "attn_out", "layer": 22, "EM_C": 0, "EM_M": 60.0},
            {"direction": "memory", "site": "attn_out", "layer": 23, "EM_C": 0, "EM_M": 70.0},
            {"direction": "memory", "site": "resid_post", "layer": 23, "EM_C": 0, "EM_M": 90.0},
        ],
    )  # fmt: skip
    shares = oracle_shares(records, best_settings(records, 10.0), scan)
    assert shares["memory"]["oracle_EM"] == 70.0  # the best attention patch at 22-23
    assert shares["memory"]["share"] == pytest.approx(30.0 / 60.0)


def test_attention_output_statistics_and_a_memory_set_there(tiny_model, tmp_path):
    """Activations and statistics at another site are cached apart from the residual's; a
    to-memory set at the attention output round-trips and loads its SAEs by hook name."""
    from spare_tl.saes import load_saes_for_hooks
    from spare_tl.stages.pipeline import PipelineConfig
    from spare_tl.stages.selection import directional_features

    grouped = _synthetic_grouped("tiny-llama")
    resid = collect_activations(tiny_model, grouped, [1], cache_root=tmp_path, progress=False)
    attn = collect_activations(
        tiny_model, grouped, [1, 2], cache_root=tmp_path, progress=False, site="attn_out"
    )
    assert attn.site == "attn_out" and resid.site == "resid_post"
    assert not torch.allclose(attn.resid[1], resid.resid[1])
    model_dir = tmp_path / "tiny-llama"
    assert (model_dir / "activations_attn_out").is_dir() and (model_dir / "activations").is_dir()
    r_saes = {1: tiny_sae("blocks.1.hook_resid_post", k=16)}
    a_saes = {x: tiny_sae(f"blocks.{x}.hook_attn_out", k=16, seed=x) for x in (1, 2)}
    with pytest.raises(Exception, match="attn_out"):  # a residual SAE on attention outputs
        feature_statistics(tiny_model, attn, r_saes, cache_root=tmp_path, progress=False)
    r_stats = feature_statistics(tiny_model, resid, r_saes, cache_root=tmp_path, progress=False)
    a_stats = feature_statistics(tiny_model, attn, a_saes, cache_root=tmp_path, progress=False)
    assert (model_dir / "mutual_information_attn_out" / "layer2").is_dir()
    features = directional_features(
        {"resid_post": r_stats, "attn_out": a_stats},
        model_name="tiny-llama",
        context=DirectionSetting(layers=(1,), proportion=0.2, edit_strength=2.0),
        memory=DirectionSetting("attn_out", (1, 2), proportion=0.2, edit_strength=3.0),
    )
    assert features.site == "resid_post" and features.to_memory.site == "attn_out"
    loaded = FunctionalFeatures.load(features.save(tmp_path / "set"))
    assert loaded.hook_names == [
        "blocks.1.hook_attn_out", "blocks.1.hook_resid_post", "blocks.2.hook_attn_out"
    ]  # fmt: skip
    saes_dir = tmp_path / "saes"
    for sae in [*r_saes.values(), *a_saes.values()]:
        sae.save_model(saes_dir / sae.cfg.metadata.hook_name)
    saes = load_saes_for_hooks(tiny_model, saes_dir, loaded.hook_names)
    assert set(saes) == set(loaded.hook_names)
    tokens = tiny_model.to_tokens("what is thing 3?")
    base = tiny_model(tokens)
    with steer(tiny_model, loaded, "memory", saes):
        assert not torch.equal(tiny_model(tokens), base)
    with pytest.raises(ValueError, match="site_layers.attn_out is empty"):
        PipelineConfig(layers=[1], site_layers={"attn_out": []})
    with pytest.raises(ValueError, match="not among the attn_out candidate layers"):
        PipelineConfig(layers=[1], site_layers={"attn_out": [2]},
                       to_memory={"layers": [1], "site": "attn_out"})  # fmt: skip
    PipelineConfig(layers=[1], site_layers={"attn_out": [2]},
                   to_memory={"layers": [2], "site": "attn_out"})  # fmt: skip
