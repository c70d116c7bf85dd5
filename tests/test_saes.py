from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from spare_tl.errors import SAEError
from spare_tl.saes import (
    attach_sae,
    encode_latents,
    load_sae,
    load_saes_for_layers,
    sae_identity,
    sae_layer,
    validate_sae,
)
from spare_tl.testing import tiny_sae


def test_saelens_folder_round_trip(tmp_path):
    sae = tiny_sae("blocks.2.hook_resid_post", architecture="topk", k=4)
    sae.save_model(tmp_path / "blocks.2.hook_resid_post")
    loaded = load_sae(tmp_path / "blocks.2.hook_resid_post")
    assert type(loaded).__name__ == "TopKSAE"
    assert loaded.cfg.k == 4 and sae_layer(loaded) == 2
    x = torch.randn(5, 32)
    assert torch.equal(encode_latents(loaded, x), encode_latents(sae, x))
    assert str(tmp_path) in sae_identity(loaded)


def test_jumprelu_round_trip(tmp_path):
    sae = tiny_sae("blocks.1.hook_resid_post", architecture="jumprelu")
    sae.save_model(tmp_path)
    loaded = load_sae(tmp_path)
    assert type(loaded).__name__ == "JumpReLUSAE"
    assert torch.equal(loaded.threshold, sae.threshold)


def test_sparsify_folder_loads_through_the_converter(tmp_path, monkeypatch):
    """An EleutherAI sparsify folder (the paper's Llama-3-8B SAE format)."""
    d_in, d_sae, k = 32, 96, 6
    folder = tmp_path / "sae-llama-tiny" / "layers.2"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(
        json.dumps({"d_in": d_in, "num_latents": d_sae, "k": k, "normalize_decoder": True})
    )
    torch.manual_seed(0)
    enc_w = torch.randn(d_sae, d_in)
    dec_w = torch.randn(d_sae, d_in)
    save_file(
        {
            "encoder.weight": enc_w,
            "encoder.bias": torch.zeros(d_sae),
            "W_dec": dec_w,  # sparsify stores W_dec as [d_sae, d_in]
            "b_dec": torch.zeros(d_in),
        },
        str(folder / "sae.safetensors"),
    )
    monkeypatch.chdir(folder.parent)  # a relative path must work too
    sae = load_sae("layers.2", dtype="float32")
    assert sae.cfg.d_sae == d_sae and sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    z = sae.encode(torch.randn(3, d_in))
    assert ((z != 0).sum(-1) <= k).all()
    assert torch.allclose(sae.W_enc, enc_w.T) and torch.allclose(sae.W_dec, dec_w)
    # sparsify's maths: z = topk(relu((x - b_dec) W_enc + b_enc)), x_hat = z W_dec + b_dec
    x = torch.randn(4, d_in)
    pre = torch.relu(x @ enc_w.T)
    top = pre.topk(k, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)


def test_folders_without_a_usable_sae_are_refused(tmp_path):
    with pytest.raises(SAEError, match="cfg.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(SAEError, match="neither"):
        load_sae(tmp_path)
    with pytest.raises(SAEError, match="sae_id"):
        load_sae("some-release-name")


def test_validate_accepts_a_fitting_sae(tiny_model):
    validate_sae(tiny_model, tiny_sae("blocks.1.hook_resid_post"), layer=1)


@pytest.mark.parametrize(
    "kwargs,layer,match",
    [
        ({"hook_name": "blocks.9.hook_resid_post"}, None, "does not exist"),
        ({"hook_name": "blocks.1.hook_resid_post", "d_in": 16}, None, "d_in 16"),
        ({"hook_name": "blocks.1.hook_resid_post"}, 2, "used for layer 2"),
        ({"hook_name": "blocks.1.hook_resid_post"}, 7, "out of range"),
        (
            {"hook_name": "blocks.1.hook_resid_post", "model_name": "gpt2"},
            None,
            "trained on 'gpt2'",
        ),
    ],
)
def test_validate_rejects_mismatches(tiny_model, kwargs, layer, match):
    with pytest.raises(SAEError, match=match):
        validate_sae(tiny_model, tiny_sae(**kwargs), layer=layer)


def test_attach_fails_where_saelens_only_warns(tiny_model):
    with pytest.raises(SAEError):
        attach_sae(tiny_model, tiny_sae("blocks.11.hook_resid_post"))
    sae = attach_sae(tiny_model, tiny_sae("blocks.1.hook_resid_post"))
    try:
        assert "blocks.1.hook_resid_post" in tiny_model.acts_to_saes
        tiny_model(tiny_model.to_tokens("abc"))
    finally:
        tiny_model.reset_saes()
    assert sae.cfg.d_in == 32


def test_load_saes_for_layers_from_folder(tmp_path, tiny_model):
    for layer in (1, 2):
        tiny_sae(f"blocks.{layer}.hook_resid_post").save_model(
            tmp_path / f"blocks.{layer}.hook_resid_post"
        )
    saes = load_saes_for_layers(tiny_model, tmp_path)
    assert sorted(saes) == [1, 2]
    with pytest.raises(SAEError, match="available: \\[1, 2\\]"):
        load_saes_for_layers(tiny_model, tmp_path, layers=[3])
