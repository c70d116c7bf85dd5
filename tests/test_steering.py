"""SpARE's edit (pure maths) and the steering hooks on a tiny random model."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spare_tl.features import FunctionalFeatures, LayerFeatures
from spare_tl.methods.spare import (
    EditStats,
    LastPromptPositionEdit,
    resid_post_hook_name,
    spare_edit,
    spare_edit_latents,
    steer,
)
from spare_tl.testing import tiny_model, tiny_sae

D_MODEL, D_SAE = 32, 128
LAYERS = (1, 2)
# Prompts of different lengths; with seed 0 their greedy continuations have no argmax near-ties,
# so batched (left-padded) and single runs agree exactly.
PROMPTS = ["hello world", "the cat sat on", "a", "question: who?\nanswer:"]
GEN = dict(max_new_tokens=8, do_sample=False, verbose=False, return_type="tokens")

PROPERTY = settings(max_examples=40, deadline=None)


def make_layer_features(
    layer: int,
    seed: int = 0,
    n_context: int = 6,
    n_memory: int = 6,
    d_sae: int = D_SAE,
    scale: float = 2.0,
) -> LayerFeatures:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(d_sae, generator=g)
    return LayerFeatures(
        layer=layer,
        hook_name=resid_post_hook_name(layer),
        context_features=ids[:n_context],
        memory_features=ids[n_context : n_context + n_memory],
        context_activations=torch.rand(d_sae, generator=g) * scale,
        memory_activations=torch.rand(d_sae, generator=g) * scale,
    )


def make_features(layers=LAYERS, edit_strength: float = 3.0, **kwargs) -> FunctionalFeatures:
    return FunctionalFeatures(
        model_name="tiny-llama",
        layers={layer: make_layer_features(layer, seed=layer, **kwargs) for layer in layers},
        proportion=0.1,
        edit_strength=edit_strength,
    )


@functools.cache
def cached_sae(architecture: str, seed: int):
    return tiny_sae("blocks.1.hook_resid_post", architecture=architecture, seed=seed)


def make_saes(architecture: str = "topk", layers=LAYERS) -> dict:
    return {
        layer: tiny_sae(resid_post_hook_name(layer), architecture=architecture, seed=layer)
        for layer in layers
    }


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def topk_sae():
    return tiny_sae("blocks.1.hook_resid_post", architecture="topk", seed=1)


# ---------------------------------------------------------------- the edit, pure maths


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.floats(0.0, 5.0),
    n_context=st.integers(0, 20),
    n_memory=st.integers(0, 20),
    direction=st.sampled_from(["context", "memory"]),
)
def test_edit_latents_properties(seed, alpha, n_context, n_memory, direction):
    g = torch.Generator().manual_seed(seed)
    f = make_layer_features(1, seed=seed, n_context=n_context, n_memory=n_memory)
    # sparse, non-negative codes like an SAE's
    z = torch.rand(5, D_SAE, generator=g) * 3 * (torch.rand(5, D_SAE, generator=g) < 0.3)
    removed, added = spare_edit_latents(z, f, direction, alpha)

    if direction == "context":
        away, away_mean, towards, towards_mean = (
            f.memory_features,
            f.memory_activations,
            f.context_features,
            f.context_activations,
        )
    else:
        away, away_mean, towards, towards_mean = (
            f.context_features,
            f.context_activations,
            f.memory_features,
            f.memory_activations,
        )
    assert (removed >= 0).all() and (added >= 0).all()
    assert (z - removed >= 0).all(), "removal drove a latent below 0"
    # only the chosen features are touched
    off_away = torch.ones(D_SAE, dtype=torch.bool)
    off_away[away] = False
    off_towards = torch.ones(D_SAE, dtype=torch.bool)
    off_towards[towards] = False
    assert (removed[:, off_away] == 0).all()
    assert (added[:, off_towards] == 0).all()
    # the exact formulas
    torch.testing.assert_close(removed[:, away], torch.minimum(alpha * away_mean[away], z[:, away]))
    target = alpha * towards_mean[towards]
    torch.testing.assert_close(added[:, towards], (target - z[:, towards]).clamp_min(0))
    # added only where the latent is below its target, and then exactly up to it
    assert (added[:, towards][z[:, towards] >= target] == 0).all()
    below = z[:, towards] < target
    torch.testing.assert_close(
        (z[:, towards] + added[:, towards])[below], target.expand_as(below)[below]
    )


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.floats(0.05, 5.0),
    direction=st.sampled_from(["context", "memory"]),
    architecture=st.sampled_from(["topk", "jumprelu", "standard"]),
)
def test_edit_is_decoder_difference(seed, alpha, direction, architecture):
    """Without normalisation the edit is W_decᵀ(a − r): the decoder bias cancels."""
    sae = cached_sae(architecture, seed % 3)
    g = torch.Generator().manual_seed(seed)
    resid = torch.randn(4, D_MODEL, generator=g) * 3
    f = make_layer_features(1, seed=seed, n_context=10, n_memory=10)
    with torch.no_grad():
        edited = spare_edit(resid, sae, f, direction, alpha)
        removed, added = spare_edit_latents(sae.encode(resid), f, direction, alpha)
        expected = (added - removed) @ sae.W_dec
    torch.testing.assert_close(edited - resid, expected, atol=1e-5, rtol=1e-4)
    # rows whose code is not changed are bitwise unchanged
    unchanged = ((removed == 0) & (added == 0)).all(-1)
    assert torch.equal(edited[unchanged], resid[unchanged])


@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale"])
def test_edit_respects_run_time_normalisation(normalize):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_post", hook_layer=1)
    sae = StandardSAE(
        StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=meta, normalize_activations=normalize)
    ).eval()
    resid = torch.randn(3, D_MODEL) * 5 + 1
    f = make_layer_features(1, n_context=10, n_memory=10)
    with torch.no_grad():
        edited = spare_edit(resid, sae, f, "context", 2.0)
        removed, added = spare_edit_latents(sae.encode(resid), f, "context", 2.0)
        step = (added - removed) @ sae.W_dec  # in the SAE's normalised space
    if normalize == "layer_norm":
        expected = step * (resid - resid.mean(-1, keepdim=True)).std(-1, keepdim=True)
    else:
        expected = step * resid.norm(dim=-1, keepdim=True) / D_MODEL**0.5
    torch.testing.assert_close(edited - resid, expected, atol=1e-4, rtol=1e-4)


def test_edit_noop_returns_input(topk_sae):
    resid = torch.randn(3, D_MODEL)
    f = make_layer_features(1)
    assert spare_edit(resid, topk_sae, f, "context", 0.0) is resid
    empty = make_layer_features(1, n_context=0, n_memory=0)
    assert spare_edit(resid, topk_sae, empty, "memory", 3.0) is resid


def test_edit_casts_back_to_resid_dtype(topk_sae):
    resid = torch.randn(3, D_MODEL, dtype=torch.float64)
    stats = EditStats()
    with torch.no_grad():
        out = spare_edit(resid, topk_sae, make_layer_features(1), "context", 3.0, stats=stats)
    assert out.dtype == torch.float64
    assert stats.calls == 1 and stats.rows_edited == 3 and stats.added > 0


def test_edit_validation(topk_sae):
    resid = torch.randn(2, D_MODEL)
    f = make_layer_features(1)
    with pytest.raises(ValueError, match="direction"):
        spare_edit(resid, topk_sae, f, "sideways", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        spare_edit(resid, topk_sae, f, "context", -1.0)
    with pytest.raises(ValueError, match="d_in"):
        spare_edit(torch.randn(2, 16), topk_sae, f, "context", 1.0)
    with pytest.raises(ValueError, match="d_sae"):
        spare_edit(resid, topk_sae, make_layer_features(1, d_sae=64), "context", 1.0)


# ---------------------------------------------------------------- hooks on a tiny model


def test_noop_steering_gives_identical_logits(model, topk_sae):
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    base = model(tokens)
    saes = make_saes()
    for features, alpha in [(make_features(), 0.0), (make_features(n_context=0, n_memory=0), 3.0)]:
        with steer(model, features, "context", saes, edit_strength=alpha):
            assert torch.equal(model(tokens), base)
    with steer(model, make_features(), None, saes) as s:
        assert not s.hooks
        assert torch.equal(model(tokens), base)
    with steer(model, make_features(), "none", saes):
        assert torch.equal(model(tokens), base)


def test_only_last_prompt_position_is_edited(model):
    features, saes = make_features(), make_saes()
    tokens = model.to_tokens(PROMPTS[3])
    names = [resid_post_hook_name(layer) for layer in range(model.cfg.n_layers)]
    _, base = model.run_with_cache(tokens, names_filter=names)
    with steer(model, features, "context", saes):
        _, steered = model.run_with_cache(tokens, names_filter=names)
    first = min(LAYERS)
    for layer, name in enumerate(names):
        if layer < first:
            assert torch.equal(steered[name], base[name]), f"layer {layer} changed"
        else:
            assert torch.equal(steered[name][:, :-1], base[name][:, :-1]), f"layer {layer}"
            assert not torch.equal(steered[name][:, -1], base[name][:, -1])


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_generation_batch_equals_single_and_cache_on_equals_off(model, architecture):
    features, saes = make_features(), make_saes(architecture)
    unsteered = model.generate(PROMPTS, **GEN)
    with steer(model, features, "context", saes) as steering:
        batched = model.generate(PROMPTS, **GEN)
        no_cache = model.generate(PROMPTS, use_past_kv_cache=False, **GEN)
        singles = [model.generate(p, **GEN)[0, -8:] for p in PROMPTS]
    assert not torch.equal(batched[:, -8:], unsteered[:, -8:]), "α too small to change tokens"
    assert torch.equal(batched, no_cache)
    for row, single in zip(batched, singles, strict=True):
        assert torch.equal(row[-8:], single)
    # prompt pass (cache) + 8 full re-runs (no cache) + 4 single prompts, all rows each
    assert {s.calls for s in steering.stats.values()} == {13}
    assert {s.rows_edited for s in steering.stats.values()} == {4 + 8 * 4 + 4}


def test_new_prompt_one_token_longer_is_not_a_continuation(model):
    """A fresh prompt of length L+1 after a 1-token generation must be edited at L, not L−1."""
    features, saes = make_features(), make_saes()
    a = model.to_tokens("abcdefg")
    b = model.to_tokens("zyxwvutsr")[:, : a.shape[1] + 1]
    with steer(model, features, "memory", saes):
        model.generate(a, max_new_tokens=1, do_sample=False, verbose=False)
        after = model(b)
    with steer(model, features, "memory", saes):
        fresh = model(b)
    assert torch.equal(after, fresh)


def test_explicit_positions_for_right_padding(model):
    features, saes = make_features(), make_saes()
    tokens = model.to_tokens(PROMPTS, padding_side="right")
    lengths = torch.tensor([model.to_tokens(p).shape[1] for p in PROMPTS])
    with steer(model, features, "context", saes, positions=lengths - 1):
        logits = model(tokens)
    for i, prompt in enumerate(PROMPTS):
        with steer(model, features, "context", saes):
            single = model(prompt)
        torch.testing.assert_close(logits[i, : lengths[i]], single[0], atol=1e-4, rtol=1e-4)


def test_hook_adapter_directly(model, topk_sae):
    hook = LastPromptPositionEdit(topk_sae, make_layer_features(1), "context", 3.0)
    resid = torch.randn(2, 5, D_MODEL)
    out = hook(resid)
    assert torch.equal(out[:, :-1], resid[:, :-1]) and not torch.equal(out[:, -1], resid[:, -1])
    assert hook(torch.randn(2, 1, D_MODEL)) is None  # a KV-cache step
    with pytest.raises(ValueError, match="positions"):
        LastPromptPositionEdit(
            topk_sae, make_layer_features(1), "context", 3.0, positions=torch.tensor([9, 9])
        )(resid)


def _fwd_hooks(model, layer):
    return model.hook_dict[resid_post_hook_name(layer)].fwd_hooks


def test_hooks_removed_on_exit_and_on_error_user_hooks_survive(model):
    features, saes = make_features(), make_saes()

    def user_hook(resid, hook):
        return None

    model.add_hook(resid_post_hook_name(1), user_hook)
    try:
        with steer(model, features, "context", saes):
            assert len(_fwd_hooks(model, 1)) == 2 and len(_fwd_hooks(model, 2)) == 1
            model.generate("hi", max_new_tokens=2, do_sample=False, verbose=False)
        assert [h.user_hook for h in _fwd_hooks(model, 1)] == [user_hook]
        assert not _fwd_hooks(model, 2)

        with pytest.raises(RuntimeError, match="boom"):
            with steer(model, features, "memory", saes):
                model("hi")
                raise RuntimeError("boom")
        assert [h.user_hook for h in _fwd_hooks(model, 1)] == [user_hook]
        assert not _fwd_hooks(model, 2)

        with steer(model, features, "context", saes):
            with model.hooks(fwd_hooks=[(resid_post_hook_name(2), user_hook)]):
                assert len(_fwd_hooks(model, 2)) == 2
            assert len(_fwd_hooks(model, 2)) == 1  # TL's own context keeps our hook
        assert not _fwd_hooks(model, 2)

        with steer(model, features, "context", saes, layers=[2]):
            assert len(_fwd_hooks(model, 1)) == 1 and len(_fwd_hooks(model, 2)) == 1
    finally:
        model.reset_hooks()
    assert not _fwd_hooks(model, 1)


def test_steer_validation(model):
    features, saes = make_features(), make_saes()
    cases = [
        (dict(saes={1: saes[2], 2: saes[2]}), "hook"),  # SAE of another hook
        (dict(saes={1: tiny_sae("blocks.1.hook_resid_post", d_sae=64), 2: saes[2]}), "d_sae"),
        (dict(saes={1: tiny_sae("blocks.1.hook_resid_post", d_in=16), 2: saes[2]}), "d_in"),
        (dict(saes={2: saes[2]}), "no SAE for layer 1"),
        (dict(edit_strength=-1.0), ">= 0"),
        (dict(direction="sideways"), "direction"),
        (dict(layers=[3]), "no functional features"),
        (
            dict(
                features=make_features(layers=(7,)),
                saes={7: tiny_sae("blocks.7.hook_resid_post")},
            ),
            "outside the model",
        ),
    ]
    for overrides, message in cases:
        kwargs = dict(features=features, direction="context", saes=saes) | overrides
        with pytest.raises(ValueError, match=message):
            with steer(model, **kwargs):
                pass
        assert not _fwd_hooks(model, 1) and not _fwd_hooks(model, 2)


def test_saes_keyed_by_hook_name_and_default_strength(model):
    features = make_features(edit_strength=0.0)
    saes = {resid_post_hook_name(k): v for k, v in make_saes().items()}
    tokens = model.to_tokens(PROMPTS[0])
    base = model(tokens)
    with steer(model, features, "context", saes) as s:  # α from features: 0
        assert s.edit_strength == 0.0
        assert torch.equal(model(tokens), base)
    with steer(model, features, "context", saes, edit_strength=3.0):
        assert not torch.equal(model(tokens), base)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_pipeline_generation_under_steering_batch_equals_single(model, architecture):
    """The pipeline's own batched loop (left padding, KV cache) keeps the properties too."""
    from spare_tl.generation import greedy_generate

    features, saes = make_features(), make_saes(architecture)
    kwargs = dict(max_new_tokens=8, stop_at_newline=False, progress=False)
    unsteered = greedy_generate(model, PROMPTS, batch_size=4, **kwargs)
    with steer(model, features, "memory", saes):
        batched = greedy_generate(model, PROMPTS, batch_size=4, **kwargs)
        singles = [greedy_generate(model, [p], batch_size=1, **kwargs)[0] for p in PROMPTS]
    assert batched == singles
    assert batched != unsteered


def test_a_separate_memory_set_steers_to_memory(model, tmp_path):
    memory_set = make_features(layers=(2,), edit_strength=1.5)
    features = dataclasses.replace(make_features(layers=(1,)), to_memory=memory_set)
    assert features.edit_layers("context") == [1] and features.edit_layers("memory") == [2]
    assert features.all_layers == [1, 2] and features.strength("memory") == 1.5
    assert features.for_direction("memory") is memory_set
    both = features.with_edit_strength(0.5)
    assert both.strength("context") == both.strength("memory") == 0.5
    assert features.strength("memory") == 1.5  # a copy: the original keeps its α
    loaded = FunctionalFeatures.load(features.save(tmp_path / "f"))
    assert loaded.to_memory is not None and sorted(loaded.to_memory.layers) == [2]
    assert loaded.strength("context") == 3.0 and loaded.strength("memory") == 1.5
    assert torch.equal(
        loaded.to_memory.layers[2].memory_features, memory_set.layers[2].memory_features
    )
    saes = make_saes()
    tokens = model.to_tokens(PROMPTS[1])
    with steer(model, loaded, "context", saes) as s:
        assert sorted(s.hooks) == [1] and s.edit_strength == 3.0 and not _fwd_hooks(model, 2)
    with steer(model, loaded, "memory", saes) as s:
        assert sorted(s.hooks) == [2] and s.edit_strength == 1.5 and not _fwd_hooks(model, 1)
        via_set = model(tokens)
    with steer(model, memory_set, "memory", saes):
        assert torch.equal(model(tokens), via_set)  # the same as steering with the memory set
    assert not _fwd_hooks(model, 1) and not _fwd_hooks(model, 2)
    # saving a plain set over it removes the stale memory set
    make_features().save(tmp_path / "f")
    assert FunctionalFeatures.load(tmp_path / "f").to_memory is None
    assert not (tmp_path / "f" / "to_memory").exists()
    other = dataclasses.replace(make_features(), model_name="other")
    with pytest.raises(ValueError, match="to_memory is for"):
        dataclasses.replace(make_features(), to_memory=other)
    with pytest.raises(ValueError, match="plain feature set"):
        dataclasses.replace(make_features(), to_memory=features)


def _attn_features(layers=LAYERS, edit_strength: float = 3.0) -> FunctionalFeatures:
    features = make_features(layers=layers, edit_strength=edit_strength)
    for layer, f in features.layers.items():
        f.hook_name = f"blocks.{layer}.hook_attn_out"
    return features


def test_attention_output_site_is_edited_where_the_features_were_found(model):
    """A set found on ``hook_attn_out`` edits the attention output (the same pure edit on
    another hook), its SAEs must be for that hook, and the residual hooks stay untouched."""
    features = _attn_features()
    saes = {
        f"blocks.{layer}.hook_attn_out": tiny_sae(f"blocks.{layer}.hook_attn_out", seed=layer)
        for layer in LAYERS
    }
    assert features.site == "attn_out" and features.last_probe_layer("memory") == 0
    assert features.hook_names == ["blocks.1.hook_attn_out", "blocks.2.hook_attn_out"]
    tokens = model.to_tokens(PROMPTS[1])
    base = model(tokens)
    with steer(model, features, "memory", saes) as s:
        for layer in LAYERS:
            assert len(model.hook_dict[f"blocks.{layer}.hook_attn_out"].fwd_hooks) == 1
            assert not _fwd_hooks(model, layer)  # nothing on the residual
        steered = model(tokens)
        assert all(st.rows_edited > 0 for st in s.stats.values())
    assert not any(model.hook_dict[f"blocks.{x}.hook_attn_out"].fwd_hooks for x in LAYERS)
    assert not torch.equal(steered, base)
    # the edit at layer 1's attention output is the pure edit of that activation
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_attn_out")
    attn = cache["blocks.1.hook_attn_out"]
    expected = attn.clone()
    expected[:, -1] = spare_edit(attn[:, -1], saes["blocks.1.hook_attn_out"],
                                 features.layers[1], "memory", 3.0)  # fmt: skip
    with steer(model, features, "memory", saes, layers=[1]):
        _, got = model.run_with_cache(tokens, names_filter="blocks.1.hook_attn_out")
    torch.testing.assert_close(got["blocks.1.hook_attn_out"], expected)
    # a residual SAE for an attention-output set is refused, naming the hook
    resid = {layer: tiny_sae(resid_post_hook_name(layer), seed=layer) for layer in LAYERS}
    with pytest.raises(ValueError, match="hook_attn_out"):
        with steer(model, features, "memory", resid):
            pass


def test_probe_must_precede_an_attention_output_edit_in_its_block(model):
    from spare_tl.studies.probes import ConflictProbe

    features = _attn_features(layers=(2,))
    saes = {"blocks.2.hook_attn_out": tiny_sae("blocks.2.hook_attn_out", seed=2)}
    probe = ConflictProbe(
        layer=2, weight=torch.zeros(D_MODEL), bias=0.0, mean=torch.zeros(D_MODEL),
        scale=torch.ones(D_MODEL), threshold=0.5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="inside that block"):
        with steer(model, features, "memory", saes, when="conflict", probe=probe):
            pass
    probe = dataclasses.replace(probe, layer=1)
    with steer(model, features, "memory", saes, when="conflict", probe=probe):
        pass
