"""The TransformerBridge backend against the hooked one: same hooks, logits, edits, answers.

A tiny random Llama saved as a local Hugging Face folder is loaded both ways (no hub); the
embedded model's agreement is in the integration tier.
"""

from __future__ import annotations

import pytest
import torch

from spare_tl.features import FunctionalFeatures
from spare_tl.generation import (
    answer_nll,
    generate_and_score,
    generate_shared_prefix,
    greedy_generate,
)
from spare_tl.methods.hooks import attach_hooks
from spare_tl.methods.spare import resid_post_hook_name, steer
from spare_tl.models import load_model
from spare_tl.stages.activations import last_position_activations
from spare_tl.testing import save_tiny_hf_llama, tiny_features, tiny_sae

pytestmark = [pytest.mark.bridge, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["hello world", "the cat sat on", "a", "question: who?\nanswer:"]
# every hook name the toolkit reads or edits
HOOK_NAMES = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "blocks.2.hook_attn_out",
    "blocks.3.hook_mlp_out",
    "blocks.1.attn.hook_z",
    "blocks.1.attn.hook_k",
    "blocks.1.attn.hook_v",
    "blocks.1.attn.hook_pattern",
    "blocks.1.attn.hook_attn_scores",
]
TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny random Llama as ``(hooked, bridge)``."""
    folder = save_tiny_hf_llama(tmp_path_factory.mktemp("tiny-hf"), n_layers=4)
    return load_model(folder), load_model(folder, backend="bridge")


def _logprobs(model, tokens, mask):
    return model(tokens, attention_mask=mask, padding_side="left").float().log_softmax(-1)


def _left_padded(model):
    from spare_tl.generation import _tokenize, left_pad

    return left_pad(model, _tokenize(model, PROMPTS))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        load_model("smollm2-135m-instruct", backend="nope")


def test_bridge_is_the_sae_bridge_with_the_hooked_settings(pair):
    from sae_lens import SAETransformerBridge

    hooked, bridge = pair
    assert isinstance(bridge, SAETransformerBridge)
    for field in ("n_layers", "d_model", "n_ctx", "default_prepend_bos", "model_name"):
        assert getattr(bridge.cfg, field) == getattr(hooked.cfg, field), field


def test_logits_agree_on_a_left_padded_batch(pair):
    hooked, bridge = pair
    tokens, mask = _left_padded(hooked)
    diff = (_logprobs(hooked, tokens, mask) - _logprobs(bridge, tokens, mask)).abs()
    assert float(diff[mask.bool()].max()) < TOL


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_names_resolve_and_carry_the_same_activations(pair, name):
    hooked, bridge = pair
    assert name in bridge.hook_dict
    _, h = hooked.run_with_cache(PROMPTS[1], names_filter=[name])
    _, b = bridge.run_with_cache(PROMPTS[1], names_filter=[name])
    assert h[name].shape == b[name].shape
    finite = torch.isfinite(h[name])  # masked attention scores are -inf on one side
    assert float((h[name] - b[name])[finite].abs().max()) < TOL


def test_last_position_activations_agree(pair):
    hooked, bridge = pair
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_attn_out", "blocks.3.hook_resid_post"]
    h = last_position_activations(hooked, PROMPTS, names, progress=False)
    b = last_position_activations(bridge, PROMPTS, names, progress=False)
    for name in names:
        assert float((h[name] - b[name]).abs().max()) < TOL


def _push_last(resid, hook):
    resid[:, -1] += 5.0
    return resid


def test_a_hook_edit_fires_and_changes_the_output_alike(pair):
    hooked, bridge = pair
    tokens, mask = _left_padded(hooked)
    plain = _logprobs(bridge, tokens, mask)
    edited = {}
    for label, model in (("hooked", hooked), ("bridge", bridge)):
        with attach_hooks(model, [("blocks.1.hook_resid_post", _push_last)]):
            edited[label] = _logprobs(model, tokens, mask)
    assert float((edited["bridge"] - plain).abs().max()) > 1e-2  # the edit did something
    assert float((edited["hooked"] - edited["bridge"]).abs().max()) < TOL
    assert float((_logprobs(bridge, tokens, mask) - plain).abs().max()) == 0.0  # hook removed
    with bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_post", _push_last)]):
        assert float((_logprobs(bridge, tokens, mask) - edited["bridge"]).abs().max()) == 0.0


def test_kv_cache_forward_equals_the_full_pass(pair):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    _, bridge = pair
    tokens, mask = _left_padded(bridge)
    n = bridge.cfg.n_layers
    full = bridge(tokens, attention_mask=mask, padding_side="left")[:, -1]
    kv = TransformerLensKeyValueCache.init_cache(bridge.cfg, bridge.cfg.device, len(PROMPTS))
    bridge(tokens[:, :-1], attention_mask=mask[:, :-1], past_kv_cache=kv, stop_at_layer=n)
    assert kv.previous_attention_mask.shape[1] == tokens.shape[1] - 1
    kv.freeze()
    resid = bridge(tokens[:, -1:], attention_mask=mask[:, -1:], past_kv_cache=kv, stop_at_layer=n)
    assert kv.previous_attention_mask.shape[1] == tokens.shape[1] - 1  # frozen: not extended
    cached = bridge.unembed(bridge.ln_final(resid))[:, -1]
    assert float((full - cached).abs().max()) < TOL


def test_generation_paths_agree(pair):
    hooked, bridge = pair
    answers = [["ab", "c d"]] * len(PROMPTS)
    out = {}
    for label, model in (("hooked", hooked), ("bridge", bridge)):

        def steering(rows, model=model):
            return model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", _push_last)])

        texts, nll = generate_and_score(
            model, PROMPTS, answers, prefix="demo: x\n", max_new_tokens=6, progress=False
        )
        out[label] = (
            greedy_generate(model, PROMPTS, max_new_tokens=8, batch_size=3, progress=False),
            texts,
            nll,
            generate_shared_prefix(
                model, PROMPTS, {"none": None, "pushed": steering}, max_new_tokens=8, progress=False
            ),
            answer_nll(model, PROMPTS, ["x", "yz", "w", "ok"]),
        )
    h, b = out["hooked"], out["bridge"]
    assert h[0] == b[0] and h[1] == b[1] and h[3] == b[3]
    assert h[3]["none"] != h[3]["pushed"]  # the steering condition changed some answer
    assert float((h[2] - b[2]).abs().max()) < 1e-4
    assert float((h[4] - b[4]).abs().max()) < 1e-4


def test_a_shared_demonstration_prefix_runs_once_on_both(pair):
    """Prompts that share a long token prefix (one demonstration set per seed): the prefix
    runs once and each row continues from its KV cache, with padding after the prefix."""
    from spare_tl.generation import MIN_SHARED_PREFIX

    hooked, bridge = pair
    demos = "context: the sky is green.\nquestion: sky?\nanswer: green\n\n"
    assert len(demos) > MIN_SHARED_PREFIX  # bytes are tokens here
    prompts = [demos + p for p in PROMPTS]
    out = {}
    for label, model in (("hooked", hooked), ("bridge", bridge)):

        def steering(rows, model=model):
            return model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", _push_last)])

        conditions = {"none": None, "pushed": steering}
        out[label] = generate_shared_prefix(
            model, prompts, conditions, max_new_tokens=8, progress=False
        )
        full = generate_shared_prefix(
            model,
            prompts,
            conditions,
            shared_demonstrations=False,
            max_new_tokens=8,
            progress=False,
        )
        assert full == out[label]  # the prefix cache gives the full passes' answers
    assert out["hooked"] == out["bridge"]


def _features() -> FunctionalFeatures:
    return tiny_features("tiny")


def test_spare_steering_gives_the_same_answers(pair):
    hooked, bridge = pair
    features = _features()
    saes = {
        layer: tiny_sae(resid_post_hook_name(layer), seed=layer, model_name=hooked.cfg.model_name)
        for layer in (1, 2)
    }
    answers = {}
    for label, model in (("hooked", hooked), ("bridge", bridge)):
        for direction in ("memory", "context"):
            with steer(model, features, direction, saes):
                answers[label, direction] = greedy_generate(
                    model, PROMPTS, max_new_tokens=8, progress=False
                )
    plain = greedy_generate(bridge, PROMPTS, max_new_tokens=8, progress=False)
    assert answers["bridge", "memory"] != plain  # steering changed something
    for direction in ("memory", "context"):
        assert answers["hooked", direction] == answers["bridge", direction]


@pytest.mark.integration
def test_embedded_model_agrees_between_backends(embedded_model):
    bridge = load_model("smollm2-135m-instruct", backend="bridge")
    prompts = [
        "The capital of France is",
        "context: The Eiffel Tower is in Rome.\nquestion: where is the Eiffel Tower?\nanswer:",
    ]
    from spare_tl.generation import _tokenize, left_pad

    tokens, mask = left_pad(embedded_model, _tokenize(embedded_model, prompts))
    diff = (_logprobs(embedded_model, tokens, mask) - _logprobs(bridge, tokens, mask)).abs()
    assert float(diff[mask.bool()].max()) < 1e-3
    assert greedy_generate(embedded_model, prompts, progress=False) == greedy_generate(
        bridge, prompts, progress=False
    )


def test_cad_agrees_between_backends(pair):
    """CAD stacks its two prompt versions' KV caches (the bridge keeps HF's layout)."""
    from spare_tl.methods.baselines import cad_generate

    demos = "context: the sky is green.\nquestion: sky?\nanswer: green\n\n"
    prompts = [demos + "context: x is y.\n" + p for p in PROMPTS]
    closed = [demos + p for p in PROMPTS]
    out = {}
    for label, model in zip(("hooked", "bridge"), pair):
        out[label] = [
            cad_generate(
                model,
                prompts,
                closed,
                alpha,
                max_new_tokens=6,
                batch_size=3,
                progress=False,
                shared_demonstrations=shared,
            )
            for alpha in (0.5, -1.0)
            for shared in (True, False)
        ]
        assert out[label][0] == out[label][1] and out[label][2] == out[label][3]
    assert out["hooked"] == out["bridge"]
