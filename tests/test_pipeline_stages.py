"""Every SpARE stage on a tiny random model and SAEs (fast)."""

from __future__ import annotations

import pytest
import torch

from spare_tl import behaviours as behaviours_mod
from spare_tl.activations import (
    collect_activations,
    feature_statistics,
    functional_features,
    last_position_resid,
)
from spare_tl.behaviours import BehaviourConfig, GroupedPrompts, group_prompts, require_groups
from spare_tl.data.schema import ConflictItem
from spare_tl.evaluation import EvaluationConfig, evaluate
from spare_tl.features import FunctionalFeatures, select_functional_features
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
    feats = functional_features(stats, model_name="tiny-llama", proportion=0.3, edit_strength=2.0)
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


def test_negative_edit_strength_is_refused():
    with pytest.raises(ValueError, match="α"):
        functional_features({}, model_name="m", proportion=0.1, edit_strength=-1)


def test_evaluate_both_directions(tiny_model, tmp_path):
    grouped = _synthetic_grouped("tiny-llama")
    acts = collect_activations(tiny_model, grouped, [1], cache_root=tmp_path, progress=False)
    saes = {1: tiny_sae("blocks.1.hook_resid_post", k=16)}
    stats = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)
    feats = functional_features(stats, model_name="tiny-llama", proportion=0.5, edit_strength=3.0)
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
    from spare_tl.sweep import best_settings, features_from_sweep, save_sweep, sweep

    grouped = _synthetic_grouped("tiny-llama")
    acts = collect_activations(tiny_model, grouped, [1, 2], cache_root=tmp_path, progress=False)
    saes = {layer: tiny_sae(f"blocks.{layer}.hook_resid_post", k=16) for layer in (1, 2)}
    stats = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)
    pool = _items(8)
    records = sweep(
        tiny_model,
        stats,
        saes,
        pool,
        layer_sets=[[1], [1, 2]],
        proportions=[0.2],
        strengths=[1.0, 4.0],
        n_items=4,
        n_shots=2,
        progress=False,
    )
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
