"""The latent code ("encode" vs "relu_pre") through SAEs, statistics, features and the edit."""

from __future__ import annotations

import json

import pytest
import torch

from spare_tl.features import DirectionSetting, FunctionalFeatures, LayerFeatures
from spare_tl.methods.spare import spare_edit, steer
from spare_tl.saes import encode_latents, is_topk
from spare_tl.stages.activations import collect_activations
from spare_tl.stages.pipeline import PipelineConfig
from spare_tl.stages.selection import functional_features
from spare_tl.stages.statistics import feature_statistics
from spare_tl.stages.sweep import combine_sweeps, save_sweep
from spare_tl.testing import tiny_sae
from tests.test_pipeline_stages import _synthetic_grouped


@pytest.fixture(scope="module")
def sae():
    return tiny_sae("blocks.1.hook_resid_post", d_in=32, d_sae=128, k=8, seed=3)


def test_relu_pre_is_the_code_before_the_top_k_cut(sae):
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    post = encode_latents(sae, x)
    pre = encode_latents(sae, x, "relu_pre")
    assert ((post != 0).sum(-1) <= 8).all()
    assert ((pre != 0).sum(-1) > 8).all()  # the cut drops latents that are active before it
    kept = post != 0
    assert torch.equal(pre[kept], post[kept])  # the top-k values are the pre-cut values
    assert (pre >= 0).all() and type(sae.activation_fn).__name__ == "TopK"  # restored
    assert torch.equal(encode_latents(sae, x), post)


def test_relu_pre_needs_a_topk_sae_and_a_known_code(sae):
    jump = tiny_sae("blocks.1.hook_resid_post", d_in=32, d_sae=128, architecture="jumprelu")
    assert is_topk(sae) and not is_topk(jump)
    with pytest.raises(ValueError, match="needs a TopK SAE"):
        encode_latents(jump, torch.randn(2, 32), "relu_pre")
    with pytest.raises(ValueError, match="latent code must be one of"):
        encode_latents(sae, torch.randn(2, 32), "post")
    with pytest.raises(ValueError, match="latent code must be one of"):
        PipelineConfig(latent_code="dense")


def _layer_features(code: str, d_sae: int = 128) -> LayerFeatures:
    g = torch.Generator().manual_seed(1)
    ids = torch.randperm(d_sae, generator=g)
    return LayerFeatures(
        layer=1,
        hook_name="blocks.1.hook_resid_post",
        context_features=ids[:20],
        memory_features=ids[20:40],
        context_activations=torch.rand(d_sae, generator=g),
        memory_activations=torch.rand(d_sae, generator=g),
        latent_code=code,
    )


def test_the_edit_uses_the_features_latent_code(sae):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    pre, post = _layer_features("relu_pre"), _layer_features("encode")
    for f in (pre, post):
        assert torch.equal(spare_edit(x, sae, f, "memory", 0.0), x)  # α = 0: identity
    # removing memory features takes away what is active in that code: in relu_pre many more
    # latents are active, so the two codes give different edits
    z = encode_latents(sae, x, "relu_pre")
    removed = torch.minimum(2.0 * pre.context_activations, z)[:, pre.context_features]
    assert removed.sum() > 0
    assert not torch.allclose(
        spare_edit(x, sae, pre, "memory", 2.0), spare_edit(x, sae, post, "memory", 2.0)
    )


def test_the_steering_hook_edits_with_the_features_latent_code(sae):
    """The hook behind steer() edits a relu_pre set with the relu_pre code (it once fell back
    to the SAE's own encode when it moved the features to the residual's device)."""
    from spare_tl.methods.spare import LastPromptPositionEdit

    resid = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(5))
    for code in ("relu_pre", "encode"):
        features = _layer_features(code)
        hook = LastPromptPositionEdit(sae, features, "memory", 2.0)
        out = hook(resid)
        assert out is not None
        expected = spare_edit(resid[:, -1], sae, features, "memory", 2.0)
        assert torch.allclose(out[:, -1], expected, atol=1e-6)
        assert torch.equal(out[:, :-1], resid[:, :-1])


def test_latent_code_round_trips_and_old_files_load_as_encode(tmp_path):
    features = FunctionalFeatures("tiny", {1: _layer_features("relu_pre")}, proportion=0.1)
    assert features.latent_code == "relu_pre"
    features.save(tmp_path / "f")
    assert FunctionalFeatures.load(tmp_path / "f").layers[1].latent_code == "relu_pre"
    meta = json.loads((tmp_path / "f" / "features.json").read_text())
    del meta["layers"]["1"]["latent_code"]  # a file written before latent codes existed
    (tmp_path / "f" / "features.json").write_text(json.dumps(meta))
    assert FunctionalFeatures.load(tmp_path / "f").latent_code == "encode"
    mixed = FunctionalFeatures(
        "tiny",
        {1: _layer_features("relu_pre"), 2: _layer_features("encode")},
        proportion=0.1,
    )
    with pytest.raises(ValueError, match="different latent codes"):
        _ = mixed.latent_code


def test_statistics_on_relu_pre_codes_are_cached_apart_and_feed_the_features(tiny_model, tmp_path):
    grouped = _synthetic_grouped("tiny-llama")
    acts = collect_activations(tiny_model, grouped, [1], cache_root=tmp_path, progress=False)
    saes = {1: tiny_sae("blocks.1.hook_resid_post", k=4)}
    post = feature_statistics(tiny_model, acts, saes, cache_root=tmp_path, progress=False)[1]
    pre = feature_statistics(
        tiny_model, acts, saes, latent_code="relu_pre", cache_root=tmp_path, progress=False
    )[1]
    assert pre.latent_code == "relu_pre" and post.latent_code == "encode"
    codes = encode_latents(saes[1], acts.resid[1], "relu_pre")
    ctx = acts.labels == 1
    assert torch.allclose(pre.expectation, codes[ctx].mean(0) - codes[~ctx].mean(0), atol=1e-5)
    assert (pre.mutual_information > 0).sum() > (post.mutual_information > 0).sum()
    again = feature_statistics(
        tiny_model, acts, saes, latent_code="relu_pre", cache_root=tmp_path, progress=False
    )[1]
    assert torch.equal(again.mutual_information, pre.mutual_information)
    assert again.latent_code == "relu_pre"  # read back from the cache
    with pytest.raises(ValueError, match="statistics of layers .1. hold .'relu_pre'."):
        functional_features({1: pre}, DirectionSetting(proportion=0.3), model_name="tiny-llama")
    features = functional_features(
        {1: pre}, DirectionSetting(proportion=0.3, latent_code="relu_pre"), model_name="tiny-llama"
    )
    assert features.latent_code == "relu_pre"
    with steer(tiny_model, features, "memory", saes) as steering:
        tiny_model(tiny_model.to_tokens(["hello there"]))
    assert steering.hooks[1].stats.calls == 1
    jump = {1: tiny_sae("blocks.1.hook_resid_post", architecture="jumprelu")}
    with pytest.raises(ValueError, match="needs a TopK SAE"):
        feature_statistics(
            tiny_model, acts, jump, latent_code="relu_pre", use_cache=False, progress=False
        )


def _record(direction: str, layers: list[int], k: float, a: float, em: float) -> dict:
    return {
        "direction": direction,
        "layers": layers,
        "proportion": k,
        "edit_strength": a,
        "n": 4,
        "EM_C": em,
        "EM_M": em,
        "neither": 0.0,
    }


def test_combine_sweeps_joins_parts_of_one_grid(tmp_path):
    none = _record("none", [], 0.0, 0.0, 10.0)
    a = [none, _record("context", [1], 0.1, 1.0, 20.0), _record("memory", [1], 0.1, 1.0, 5.0)]
    b = [none, _record("context", [2], 0.1, 1.0, 30.0), _record("memory", [1], 0.1, 1.0, 5.0)]
    save_sweep(a, tmp_path / "a", {"layer_sets": [[1]], "proportions": [0.1], "seconds": 5})
    save_sweep(b, tmp_path / "b", {"layer_sets": [[2]], "proportions": [0.1], "seconds": 7})
    records, config = combine_sweeps([tmp_path / "a" / "sweep.json", tmp_path / "b" / "sweep.json"])
    assert records[0] == none and len(records) == 4  # the repeated record once
    assert config["layer_sets"] == [[1], [2]] and config["seconds"] == 12
    other = [_record("none", [], 0.0, 0.0, 50.0)]
    save_sweep(other, tmp_path / "c", {})
    with pytest.raises(ValueError, match="no-steering record differs"):
        combine_sweeps([tmp_path / "a" / "sweep.json", tmp_path / "c" / "sweep.json"])


def test_combine_sweeps_refuses_parts_run_in_different_dtypes(tmp_path):
    none = _record("none", [], 0.0, 0.0, 10.0)
    save_sweep([none], tmp_path / "a", {"dtype": "torch.float32"})
    save_sweep([none], tmp_path / "b", {"dtype": "torch.bfloat16"})
    with pytest.raises(ValueError, match="different dtypes"):
        combine_sweeps([tmp_path / "a" / "sweep.json", tmp_path / "b" / "sweep.json"])
    save_sweep([none], tmp_path / "c", {"dtype": "torch.float32"})
    _, config = combine_sweeps([tmp_path / "a" / "sweep.json", tmp_path / "c" / "sweep.json"])
    assert config["dtype"] == "torch.float32"
