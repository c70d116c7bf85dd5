"""Tiny random models, tokenizers and SAEs built in memory (seconds, no downloads).

Used by the test suite and by anyone who wants to try a code path without a real model.
The model is Llama-family (RMS norm, rotary, gated SiLU MLP, grouped-query attention), so it
exercises the same TransformerLens code as SmolLM2, Llama-2/3.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

TINY_MODEL_NAME = "tiny-llama"


def tiny_tokenizer(directory: str | Path | None = None):
    """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>), saved to ``directory``.

    TransformerLens may reload a tokenizer from its ``name_or_path``, so it is saved to disk
    (a temporary folder when ``directory`` is None) and loaded back from there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    directory = Path(directory or tempfile.mkdtemp(prefix="spare-tl-tok-"))
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def tiny_config(
    n_layers: int = 4,
    d_model: int = 32,
    n_heads: int = 4,
    n_key_value_heads: int = 2,
    d_mlp: int = 64,
    n_ctx: int = 256,
    d_vocab: int = 259,
):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        model_name=TINY_MODEL_NAME,
        n_layers=n_layers,
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        n_key_value_heads=n_key_value_heads,
        d_mlp=d_mlp,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_model // n_heads,
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=True,
    )


def tiny_model(seed: int = 0, **config_overrides):
    """A random tiny Llama-family ``HookedSAETransformer`` with a byte-level tokenizer."""
    from sae_lens import HookedSAETransformer

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = tiny_config(d_vocab=len(tok), **config_overrides)
    cfg.seed = seed
    model = HookedSAETransformer(cfg, tokenizer=tok)
    model.eval()
    return model


def tiny_sae(
    hook_name: str = "blocks.1.hook_resid_post",
    d_in: int = 32,
    d_sae: int = 128,
    architecture: str = "topk",
    k: int = 8,
    seed: int = 0,
    model_name: str = TINY_MODEL_NAME,
):
    """A random SAELens SAE (``topk``, ``jumprelu`` or ``standard``) for ``hook_name``."""
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else None
    meta = SAEMetadata(
        hook_name=hook_name, model_name=model_name, hook_layer=layer, prepend_bos=True
    )
    if architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    elif architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    else:
        raise ValueError(f"unknown architecture {architecture!r}: use topk, jumprelu or standard")
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    sae.eval()
    return sae


def save_tiny_hf_llama(directory: str | Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` + tokenizer as a local Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tok = tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def conflict_items(n: int, start: int = 0) -> list:
    """``n`` synthetic conflict items ``q{i}?`` (memory answer ``m{i}``, context ``c{i}``),
    two relations alternating: for tests of prompts, evaluation and steering."""
    from spare_tl.data.schema import ConflictItem

    return [
        ConflictItem(
            question=f"q{i}?",
            org_context=f"X{i} is m{i}.",
            org_answer=(f"m{i}",),
            sub_context=f"X{i} is c{i}.",
            sub_answer=(f"c{i}",),
            relation=f"r{i % 2}",
        )
        for i in range(start, start + n)
    ]


def tiny_features(
    model_name: str = TINY_MODEL_NAME,
    layers=(1, 2),
    d_sae: int = 128,
    scale: float = 2.0,
    edit_strength: float = 3.0,
):
    """Random functional features for :func:`tiny_sae`-sized SAEs at the residual of
    ``layers``: 6 context and 6 memory latents per layer (seeded by the layer), mean codes
    uniform in ``[0, scale)``, K = 0.1."""
    from spare_tl.features import FunctionalFeatures, LayerFeatures
    from spare_tl.saes import site_hook_name

    found = {}
    for layer in layers:
        g = torch.Generator().manual_seed(layer)
        ids = torch.randperm(d_sae, generator=g)
        found[layer] = LayerFeatures(
            layer=layer,
            hook_name=site_hook_name(layer, "resid_post"),
            context_features=ids[:6],
            memory_features=ids[6:12],
            context_activations=torch.rand(d_sae, generator=g) * scale,
            memory_activations=torch.rand(d_sae, generator=g) * scale,
        )
    return FunctionalFeatures(
        model_name=model_name, layers=found, proportion=0.1, edit_strength=edit_strength
    )
