"""The TransformerBridge backend: a Hugging Face model behind TransformerLens hook names.

``load_model(..., backend="bridge")`` returns a :class:`SpareBridge`, an SAELens
``SAETransformerBridge`` in TransformerLens's compatibility mode without weight processing:
the hook names the toolkit uses (``blocks.{l}.hook_resid_post``, ``hook_attn_out``,
``attn.hook_z``, ...) resolve to the bridge's own hook points, ``model.hooks(...)`` and
``hook_dict[name].add_hook`` fire, and ``add_sae`` splices SAEs in.

The one interface the bridge lacks is the hooked model's KV-cache forward
(``model(tokens, attention_mask=, past_kv_cache=, stop_at_layer=n_layers)`` returning the
final residual), which the toolkit's batched generation uses. :class:`SpareBridge` provides
it: the TransformerLens cache object carries the Hugging Face keys and values (batch first,
so slicing and expanding rows works as on the hooked model) and each forward hands them to
the wrapped model as a ``DynamicCache``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

logger = logging.getLogger(__name__)

BACKENDS = ("hooked", "bridge")


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`; else a one-line error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


@functools.cache
def _bridge_class():
    from sae_lens import SAETransformerBridge

    class SpareBridge(SAETransformerBridge):
        """An ``SAETransformerBridge`` that also runs the hooked model's KV-cache forward."""

        def forward(self, input, *args: Any, past_kv_cache=None, stop_at_layer=None, **kwargs):
            if past_kv_cache is not None:
                if args:
                    raise TypeError("pass the KV-cache forward's options by keyword")
                return _cached_forward(self, input, past_kv_cache, stop_at_layer, **kwargs)
            if stop_at_layer is not None and stop_at_layer == self.cfg.n_layers:
                return _final_residual(self, input, *args, **kwargs)
            return super().forward(input, *args, stop_at_layer=stop_at_layer, **kwargs)

    return SpareBridge


def is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (of any subclass)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - TransformerLens without the bridge
        return False
    return isinstance(model, TransformerBridge)


def _final_residual(model, input, *args: Any, **kwargs: Any) -> Tensor:
    """Run the model and return the last block's output (before the final norm), as the
    hooked model does for ``stop_at_layer=n_layers``; only the last position is unembedded."""
    captured: list[Tensor] = []
    point = model.hook_dict[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    # registered after any user hook on the same point, so it sees their edits
    handle = point.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        super(type(model), model).forward(input, *args, logits_to_keep=1, **kwargs)
    finally:
        handle.remove()
    return captured[-1]


def _cached_forward(
    model,
    tokens: Int[Tensor, "batch pos"],
    kv,
    stop_at_layer: int | None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    **kwargs: Any,
) -> Float[Tensor, "batch pos d"]:
    """The hooked model's KV-cache forward on the bridge.

    ``kv`` is a ``TransformerLensKeyValueCache``; its entries hold the wrapped model's keys
    and values (``[batch, kv_heads, pos, d_head]``, after rotary) and its attention mask the
    positions seen so far. A frozen cache is read but not extended.
    """
    from transformers import DynamicCache

    n_layers = model.cfg.n_layers
    if stop_at_layer not in (None, n_layers):
        raise NotImplementedError("the bridge's KV-cache forward runs every layer")
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    past_mask = kv.previous_attention_mask.to(attention_mask.device)
    full_mask = torch.cat([past_mask.to(attention_mask.dtype), attention_mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, past_mask.shape[1] :]
    seen = past_mask.shape[1] > 0
    cache = DynamicCache(
        ddp_cache_data=[(e.past_keys, e.past_values) for e in kv.entries] if seen else None
    )
    kwargs.update(attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True)
    if stop_at_layer is None:
        out = super(type(model), model).forward(tokens, **kwargs)
    else:
        out = _final_residual(model, tokens, **kwargs)
    if not kv.frozen:
        for entry, layer in zip(kv.entries, cache.layers):
            entry.past_keys, entry.past_values = layer.keys, layer.values
        kv.previous_attention_mask = full_mask
    return out


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]


def hf_model_from_gguf(path: Path, model_name: str, cache_dir: Path | None):
    """``(hf_model, tokenizer)`` of a Llama-family GGUF, de-quantised in fp32; with
    ``cache_dir`` the Hugging Face weights are kept there (written then renamed) so the next
    load skips the de-quantisation."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache_dir / f"{model_name}-{_cache_key(path)}-hf" if cache_dir else None
    if cache is not None and (cache / "model.safetensors").exists():
        # the folder is a Hugging Face model folder (config, tokenizer, safetensors weights)
        hf_model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
        return hf_model.eval(), AutoTokenizer.from_pretrained(cache)
    logger.info("de-quantising %s for the bridge (first load; later loads use %s)", path, cache)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    if cache is not None:
        try:
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(tmp)
            hf_model.config.save_pretrained(tmp)
            tied = set(getattr(hf_model, "_tied_weights_keys", None) or ())
            if not hf_model.config.tie_word_embeddings:
                tied = set()
            state = {
                k: v.detach().contiguous()
                for k, v in hf_model.state_dict().items()
                if k not in tied
            }
            save_file(state, str(tmp / "model.safetensors"))
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
            tmp.rename(cache)
        except OSError as e:  # a read-only home must not stop the load
            logger.warning("could not cache de-quantised weights in %s: %s", cache, e)
    return hf_model.eval(), tok


def bridge_from_hf(
    hf_model,
    tokenizer,
    model_name: str,
    *,
    n_ctx: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Wrap a loaded Hugging Face causal LM as a :class:`SpareBridge` (no weight processing,
    the hooked model's hook names, BOS as the tokenizer adds it)."""
    hf_model = hf_model.to(device=device or "cpu", dtype=dtype).eval()
    bridge = _bridge_class().boot_transformers(
        model_name, hf_model=hf_model, tokenizer=tokenizer, device=device or "cpu", dtype=dtype
    )
    return _finish(bridge, tokenizer, model_name, n_ctx)


def bridge_from_hub(name: str, *, n_ctx=None, device=None, dtype=torch.float32, **kwargs: Any):
    """A hub model as a :class:`SpareBridge` (needs the hub)."""
    bridge = _bridge_class().boot_transformers(name, device=device, dtype=dtype, **kwargs)
    return _finish(bridge, bridge.tokenizer, name, n_ctx, keep_bos=True)


def _cache_as_past_key_values(_module, args, kwargs):
    """transformers 5 hands attention the KV cache as ``cache=``; TransformerLens 3.9's
    attention bridges read only ``past_key_values`` (else they skip the cache silently)."""
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


def _finish(bridge, tokenizer, model_name: str, n_ctx: int | None, keep_bos: bool = False):
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    for block in bridge.blocks:
        block.attn.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)
    bridge.cfg.model_name = model_name
    if not keep_bos:
        bridge.cfg.default_prepend_bos = bool(getattr(tokenizer, "add_bos_token", False))
    if n_ctx:
        bridge.cfg.n_ctx = min(int(n_ctx), int(bridge.cfg.n_ctx))
    return bridge.eval()
