"""The attribution stage and the selection by attribution, on a tiny random model and SAEs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from spare_tl.features import DirectionSetting, select_by_attribution, select_features
from spare_tl.stages.activations import collect_activations
from spare_tl.stages.attribution import (
    GROUPS,
    LayerAttribution,
    attribution_scores,
    exact_patch_effects,
    latent_attribution,
    latent_gradients,
)
from spare_tl.stages.behaviours import GroupedPrompts
from spare_tl.stages.selection import directional_features, functional_features
from spare_tl.stages.statistics import feature_statistics
from spare_tl.testing import tiny_sae

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    f"context: thing {i} is c{i}.\nquestion: what is thing {i}?\nanswer:" + " x" * (i % 3)
    for i in range(12)
]
MEMORY = torch.arange(10, 22)  # one answer token per prompt
CONTEXT = torch.arange(60, 72)


def _saes(layers=(1, 2), architecture="topk"):
    return {
        f"blocks.{x}.hook_resid_post": tiny_sae(
            f"blocks.{x}.hook_resid_post", k=16, seed=x, architecture=architecture
        )
        for x in layers
    }


def _full_metric_and_resid_grad(model, prompt, memory, context, hook):
    """m and dm/dh at the last position of ``hook`` from one plain full forward."""
    tokens = model.to_tokens(prompt)
    zero = torch.zeros(model.cfg.d_model, requires_grad=True)

    def add(act, hook):
        act = act.clone()
        act[:, -1] = act[:, -1] + zero
        return act

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])[0, -1]
        m = logits[memory] - logits[context]
        (grad,) = torch.autograd.grad(m, [zero])
    return float(m.detach()), grad


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_gradient_is_the_decoder_projection_of_the_residual_gradient(tiny_model, architecture):
    saes = _saes(architecture=architecture)
    codes, grads, metric = latent_gradients(
        tiny_model, PROMPTS, MEMORY, CONTEXT, saes, batch_size=5
    )
    for p in (0, 4, 11):  # rows of different padding in their batches
        for hook, sae in saes.items():
            m, g_resid = _full_metric_and_resid_grad(
                tiny_model, PROMPTS[p], int(MEMORY[p]), int(CONTEXT[p]), hook
            )
            assert metric[p] == pytest.approx(m, abs=1e-4)
            expected = sae.W_dec.detach() @ g_resid  # decode is z @ W_dec + b_dec
            assert torch.allclose(grads[hook][p], expected, atol=1e-5)
            z = sae.encode(tiny_model.run_with_cache(PROMPTS[p])[1][hook][0, -1])
            assert torch.allclose(codes[hook][p], z, atol=1e-5)
            assert (codes[hook][p] > 0).any() and grads[hook][p].abs().sum() > 0


def test_attribution_tracks_exact_one_latent_patching(tiny_model):
    """g (z̄ − z) against setting one latent to z̄ and rerunning: a broken gradient, target,
    sign or layer gives a low or negative correlation."""
    saes = _saes()
    codes, grads, _ = latent_gradients(tiny_model, PROMPTS, MEMORY, CONTEXT, saes, batch_size=5)
    latents = torch.arange(0, 128, 3)
    for hook, sae in saes.items():
        target = codes[hook][::2].mean(0) + 0.2  # a group mean, and something to move to
        estimate = attribution_scores(codes[hook], grads[hook], target)[:, latents]
        exact = exact_patch_effects(tiny_model, PROMPTS, MEMORY, CONTEXT, sae, latents, target)
        assert exact.abs().mean() > 1e-3
        r = torch.corrcoef(torch.stack([estimate.flatten(), exact.flatten()]))[0, 1]
        assert r > 0.9, f"{hook}: attribution vs exact patching r = {float(r):.3f}"


def _grouped(n: int = 24) -> GroupedPrompts:
    records = []
    for i in range(n):
        records.append(
            {
                "prompt": f"context: thing {i} is c{i}.\nquestion: what is thing {i}?\nanswer:"
                + " x" * (i % 3),
                "label": ["context", "memory", "neither"][i % 3],
                "org_answer": [f"m{i % 7}"],
                # every fourth shares its first letter with the memory answer: left out
                "sub_answer": [f"m{i}" if i % 4 == 0 else f"{chr(97 + i % 5)}{i}"],
                "nll_context": 1.0 + i % 2,
                "nll_memory": 2.0,
            }
        )
    return GroupedPrompts("tiny-llama", records, {"model": "tiny-llama"})


def test_answer_first_tokens_follow_the_answer_after_a_space(tiny_model):
    from spare_tl.stages.attribution import answer_first_tokens

    ids = answer_first_tokens(tiny_model, ["Paris", "  Rome "])
    expected = [
        tiny_model.tokenizer(" " + a, add_special_tokens=False)["input_ids"][0]
        for a in ("Paris", "Rome")
    ]
    assert ids.tolist() == expected


def _first_byte(model, answers):
    """The tiny byte-level tokenizer spells every " answer" with the same first token (the
    space): the answers' first letters stand in for their first tokens."""
    return torch.tensor(
        [model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    )


@pytest.fixture
def staged(tiny_model, tmp_path, monkeypatch):
    from spare_tl.stages import attribution as attribution_mod

    monkeypatch.setattr(attribution_mod, "answer_first_tokens", _first_byte)
    grouped = _grouped()
    acts = collect_activations(tiny_model, grouped, [1, 2], cache_root=tmp_path, progress=False)
    saes = {x: tiny_sae(f"blocks.{x}.hook_resid_post", k=16, seed=x) for x in (1, 2)}
    stats = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)
    attr = latent_attribution(tiny_model, grouped, stats, saes, cache_root=tmp_path, progress=False)
    return grouped, saes, stats, attr


def test_stage_means_cache_and_recompute(tiny_model, tmp_path, staged, monkeypatch):
    from spare_tl.stages import attribution as attribution_mod

    grouped, saes, stats, attr = staged
    a = attr[1]
    assert a.to_context.shape == (len(GROUPS), 128) and a.counts["all"] == 16 - 4
    assert a.counts["use_context"] + a.counts["use_memory"] == a.counts["all"]
    # the stored means are those of the per-prompt scores, with the sign toward each direction
    prompts = [r["prompt"] for r in grouped.records if r["label"] == "memory"]
    kept = [r for r in grouped.records if r["label"] == "memory"]
    mem = _first_byte(tiny_model, [r["org_answer"][0] for r in kept])
    ctx = _first_byte(tiny_model, [r["sub_answer"][0] for r in kept])
    codes, grads, _ = latent_gradients(
        tiny_model, prompts, mem, ctx, {"blocks.1.hook_resid_post": saes[1]}
    )
    z, g = codes["blocks.1.hook_resid_post"], grads["blocks.1.hook_resid_post"]
    keep = mem != ctx
    expected = -attribution_scores(z, g, stats[1].context_activations)[keep].mean(0)
    assert torch.allclose(a.toward("context"), expected, atol=1e-5)  # use-memory prompts
    assert torch.equal(a.toward("context", "use_memory"), a.to_context[1])
    # cached: no recompute; other targets: recomputed
    monkeypatch.setattr(attribution_mod, "latent_gradients", lambda *a, **k: pytest.fail("ran"))
    again = latent_attribution(tiny_model, grouped, stats, saes, cache_root=tmp_path)
    assert torch.equal(again[2].to_memory, attr[2].to_memory)
    assert (tmp_path / "tiny-llama" / "attribution" / "resid_post-2" / "config.json").is_file()
    stats[2].memory_activations = stats[2].memory_activations * 2
    with pytest.raises(pytest.fail.Exception, match="ran"):
        latent_attribution(tiny_model, grouped, stats, saes, cache_root=tmp_path)
    loaded = LayerAttribution.load(tmp_path / "tiny-llama" / "attribution" / "resid_post-1")
    assert torch.equal(loaded.to_context, a.to_context) and loaded.counts == a.counts


def test_selection_by_attribution_on_a_hand_example():
    attr = torch.tensor([0.5, -2.0, 0.3, 0.1, 0.1, 0.0])
    e = torch.tensor([1.0, -1.0, -2.0, 0.0, 5.0, 3.0])
    # positive total 1.0, sorted 0.5, 0.3, 0.1, 0.1: K = 0.6 needs k = 2 -> latents 0, 2
    ctx, mem = select_by_attribution(attr, e, 0.6)
    assert ctx.tolist() == [0] and mem.tolist() == [2]
    # K = 1: every latent with positive attribution and E != 0 (3 has E = 0; 1 hurts)
    ctx, mem = select_by_attribution(attr, e, 1.0)
    assert sorted(ctx.tolist()) == [0, 4] and mem.tolist() == [2]
    mi = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.0, 0.1])
    ctx, mem = select_features("both", 0.5, mi, e, attr)
    assert ctx.tolist() == [0] and mem.tolist() == [1, 2]  # MI's latent 1, then attribution's
    with pytest.raises(ValueError, match="needs the latents' attribution"):
        select_features("attribution", 0.5, mi, e)
    with pytest.raises(ValueError, match="selection must be one of"):
        select_features("causal", 0.5, mi, e, attr)


def test_feature_sets_by_attribution(staged):
    _, _, stats, attr = staged
    by_attribution = DirectionSetting(proportion=0.3, selection="attribution")
    feats = functional_features(
        stats, by_attribution, model_name="tiny-llama", direction="memory", attribution=attr
    )
    ctx, mem = select_by_attribution(attr[2].toward("memory"), stats[2].expectation, 0.3)
    assert torch.equal(feats.layers[2].context_features, ctx)
    assert torch.equal(feats.layers[2].memory_features, mem)
    assert feats.metadata["selection"] == "attribution"
    with pytest.raises(ValueError, match="direction"):
        functional_features(
            stats, DirectionSetting(proportion=0.3, selection="both"), model_name="m"
        )
    with pytest.raises(ValueError, match="no attribution for layer 2"):
        functional_features(stats, DirectionSetting(proportion=0.3, selection="both"),
                            model_name="m", direction="memory", attribution={1: attr[1]})  # fmt: skip
    setting = DirectionSetting(layers=(1, 2), proportion=0.3, edit_strength=2.0)
    mi = directional_features(stats, model_name="tiny-llama", context=setting, memory=setting)
    assert mi.to_memory is None and mi.metadata["selection"] == "mi"
    by_attr = directional_features(
        stats,
        model_name="tiny-llama",
        context=setting,
        memory=replace(setting, selection="attribution"),
        attribution={"resid_post": attr},
    )  # the memory set is chosen for memory: a set of its own
    assert by_attr.metadata["selection"] == "mi"
    assert by_attr.to_memory.metadata["selection"] == "attribution"
    assert torch.equal(by_attr.to_memory.layers[2].memory_features, mem)
    stats[1].sae_fingerprint = "another"
    with pytest.raises(ValueError, match="another SAE"):
        functional_features(stats, by_attribution, model_name="m", direction="context",
                            attribution=attr)  # fmt: skip


def test_config_selection_per_direction():
    from spare_tl.stages.pipeline import PipelineConfig

    config = PipelineConfig(
        layers=[1, 2, 3], to_context={"layers": [1, 2], "selection": "both"},
        to_memory={"layers": [3], "selection": "attribution"},
    )  # fmt: skip
    settings = config.direction_settings()
    assert settings["context"].selection == "both"
    assert settings["memory"].selection == "attribution"
    assert config.attribution_layers() == {"resid_post": [1, 2, 3]}
    assert PipelineConfig(layers=[1, 2]).attribution_layers() == {}
    with pytest.raises(ValueError, match="selection must be one of"):
        PipelineConfig(layers=[1], to_context={"selection": "causal"})
    with pytest.raises(ValueError, match="selection must be one of"):
        PipelineConfig(layers=[1], to_memory={"layers": [1], "selection": "x"})


def test_sweep_tries_the_selection_per_direction(tiny_model, staged, tmp_path):
    from spare_tl.cache import write_json
    from spare_tl.stages.sweep import combine_sweeps, features_from_sweep, grid, sweep
    from spare_tl.testing import conflict_items

    _, saes, stats, attr = staged
    settings = grid({"resid_post": [[1, 2]]}, [0.3], [2.0], selections=("mi", "attribution"))
    assert [(s.direction, s.setting.selection) for s in settings] == [
        ("context", "mi"), ("context", "attribution"), ("memory", "mi"), ("memory", "attribution")
    ]  # fmt: skip
    items = conflict_items(10)
    with pytest.raises(ValueError, match="no attribution for layer"):
        sweep(tiny_model, stats, saes, items[6:], items[:6], settings, n_shots=1, progress=False)
    records = sweep(
        tiny_model, stats, saes, items[6:], items[:6], settings, n_shots=1, progress=False,
        attribution={"resid_post": attr},
    )  # fmt: skip
    assert [r.get("selection") for r in records] == [None, "mi", "attribution", "mi", "attribution"]
    by_attr = functional_features(
        stats, DirectionSetting(layers=(1, 2), proportion=0.3, selection="attribution"),
        model_name="tiny-llama", direction="memory", attribution=attr,
    )  # fmt: skip
    assert records[4]["n_features"] == sum(c + m for c, m in by_attr.counts().values())
    # the best record per direction carries its selection into the feature set
    best = [records[0], {**records[1], "EM_C": 100.0}, {**records[4], "EM_M": 100.0}]
    chosen = features_from_sweep(best, stats, "tiny-llama", attribution={"resid_post": attr})
    assert chosen.metadata["selection"] == "mi"
    assert chosen.to_memory.metadata["selection"] == "attribution"
    assert chosen.to_memory.counts() == by_attr.counts()
    # parts of a grid differing only in the selection stay apart when combined
    paths = []
    for i, part in enumerate((records[:2], [records[0], records[2]])):
        paths.append(tmp_path / f"part{i}.json")
        write_json(paths[-1], {"config": {"selections": [part[1]["selection"]]}, "records": part})
    combined, config = combine_sweeps(paths)
    assert len(combined) == 3 and config["selections"] == ["mi", "attribution"]
