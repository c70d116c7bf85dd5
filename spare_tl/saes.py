"""The one place that knows about SAEs: load them, check them against a model, encode.

Sources: a SAELens pretrained release + id (hub), a local SAELens folder (``cfg.json`` +
``sae_weights.safetensors``), or an EleutherAI ``sparsify`` folder (``cfg.json`` +
``sae.safetensors``, e.g. the paper's Llama-3-8B SAEs) through SAELens's converter.

SAE codes (the *latent code*), chosen per feature set and used for both the statistics
(mutual information, expectation, z̄) and the edit:

- ``"encode"``: the SAE's own ``encode``, i.e. the **post-top-k** code for TopK SAEs and the
  post-JumpReLU code for JumpReLU SAEs (Gemma Scope);
- ``"relu_pre"``: for TopK SAEs, ReLU of the encoder pre-activations *before* the top-k cut
  (scaled by the decoder norms where the SAE does so), as SpARE's released code does for
  its TopK SAEs. Denser, so the k-NN mutual information ranks more latents, and more
  steadily across its noise seeds (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from spare_tl.errors import SAEError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG = "cfg.json"

LatentCode = Literal["encode", "relu_pre"]
LATENT_CODES: tuple[str, ...] = ("encode", "relu_pre")


def load_sae(
    release_or_path: str | os.PathLike,
    sae_id: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
):
    """Load an SAE from a local folder (SAELens or sparsify format) or a SAELens release.

    >>> load_sae("gemma-scope-9b-pt-res-canonical", "layer_23/width_131k/canonical")  # hub
    >>> load_sae("cache_data/smollm2-135m-instruct/saes/blocks.12.hook_resid_post")  # local
    """
    from sae_lens import SAE

    path = Path(release_or_path).expanduser()
    if path.is_dir():
        if not (path / CFG).exists():
            raise SAEError(f"{path} holds no {CFG}: not a SAELens or sparsify SAE folder")
        if (path / SAELENS_WEIGHTS).exists():
            sae = SAE.load_from_disk(path, device=str(device), dtype=dtype)
        elif (path / SPARSIFY_WEIGHTS).exists():
            sae = SAE.load_from_disk(
                path.resolve(), device=str(device), dtype=dtype, converter=sparsify_disk_converter
            )
        else:
            raise SAEError(
                f"{path} has {CFG} but neither {SAELENS_WEIGHTS} (SAELens) nor "
                f"{SPARSIFY_WEIGHTS} (sparsify)"
            )
        sae.cfg.metadata.sae_id = sae.cfg.metadata.sae_id or str(path)
    else:
        if sae_id is None:
            raise SAEError(
                f"{release_or_path!r} is not a folder; for a SAELens release also pass sae_id, "
                "e.g. load_sae('gemma-scope-9b-pt-res-canonical', 'layer_23/width_131k/canonical')"
            )
        converter = sparsify_hub_converter if re.match(r"layers[._]\d+$", sae_id) else None
        sae = SAE.from_pretrained(
            str(release_or_path), sae_id, device=str(device), converter=converter
        )
        if dtype is not None:
            sae = sae.to(dtype=getattr(torch, dtype))
        sae.cfg.metadata.release = sae.cfg.metadata.release or str(release_or_path)
        sae.cfg.metadata.sae_id = sae.cfg.metadata.sae_id or sae_id
    return sae.eval()


def _fix_sparsify(cfg: dict[str, Any], state: dict[str, Tensor]) -> None:
    """Keep sparsify's own maths: W_dec is stored [d_sae, d_in] (SAELens 6.54's converter
    transposes it into the wrong shape) and the encoder always subtracts b_dec."""
    if state["W_dec"].shape == (cfg["d_in"], cfg["d_sae"]) and cfg["d_in"] != cfg["d_sae"]:
        state["W_dec"] = state["W_dec"].T.contiguous()
    cfg["apply_b_dec_to_input"] = True


def sparsify_disk_converter(path, device: str = "cpu", cfg_overrides=None):
    """SAELens disk converter for an EleutherAI sparsify folder (``layers.<L>``)."""
    from sae_lens.loading.pretrained_sae_loaders import (
        get_sparsify_config_from_disk,
        load_safetensors_weights,
    )

    path = Path(path).resolve()
    cfg = get_sparsify_config_from_disk(path, device, cfg_overrides)
    raw = load_safetensors_weights(path / SPARSIFY_WEIGHTS, device=device, dtype=cfg.get("dtype"))
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    w_enc = raw["W_enc"] if "W_enc" in raw else raw["encoder.weight"].T
    w_dec = raw["W_dec"] if "W_dec" in raw else raw["decoder.weight"].T
    zeros = torch.zeros
    state = {
        "W_enc": w_enc.contiguous(),
        "b_enc": raw.get("b_enc", raw.get("encoder.bias", zeros(d_sae, dtype=w_enc.dtype))),
        "W_dec": w_dec.contiguous(),
        "b_dec": raw.get("b_dec", raw.get("decoder.bias", zeros(d_in, dtype=w_enc.dtype))),
    }
    _fix_sparsify(cfg, state)
    return cfg, state


def sparsify_hub_converter(
    repo_id, folder_name, device="cpu", force_download=False, cfg_overrides=None
):
    """SAELens hub converter for sparsify releases (e.g. ``EleutherAI/sae-llama-3-8b-32x``)."""
    from sae_lens.loading.pretrained_sae_loaders import sparsify_huggingface_loader

    try:
        cfg, state, sparsity = sparsify_huggingface_loader(
            repo_id, folder_name, device, force_download, cfg_overrides
        )
    except RuntimeError:  # the installed converter may mis-shape W_dec; load raw instead
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id, allow_patterns=[f"{folder_name}/*"])
        cfg, state = sparsify_disk_converter(Path(root) / folder_name, device, cfg_overrides)
        return cfg, state, None
    _fix_sparsify(cfg, state)
    return cfg, state, sparsity


def hook_name(sae) -> str:
    """The hook point the SAE was trained on."""
    name = getattr(sae.cfg.metadata, "hook_name", None)
    if not name:
        raise SAEError("the SAE's metadata has no hook_name; set sae.cfg.metadata.hook_name")
    return str(name)


#: The hook points SpARE can read and edit in a block: the residual after it, or its
#: attention / MLP output (``blocks.<l>.hook_<site>``).
SITES: tuple[str, ...] = ("resid_post", "attn_out", "mlp_out")
DEFAULT_SITE = "resid_post"


def check_site(site: str) -> str:
    """``site`` if SpARE can edit there, else a ValueError listing the sites."""
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    return site


def site_hook_name(layer: int, site: str = DEFAULT_SITE) -> str:
    """The TransformerLens hook of ``site`` in block ``layer``: ``blocks.<l>.hook_<site>``."""
    return f"blocks.{int(layer)}.hook_{check_site(site)}"


def site_of_hook(name: str) -> str:
    """The site of a block hook name (``blocks.23.hook_attn_out`` -> ``attn_out``)."""
    m = re.fullmatch(r"blocks\.\d+\.hook_(\w+)", name)
    if not m or m.group(1) not in SITES:
        raise SAEError(
            f"hook {name!r} is not a site SpARE edits (blocks.<l>.hook_<site>, site one of "
            f"{', '.join(SITES)})"
        )
    return m.group(1)


def sae_site(sae) -> str:
    """The site the SAE reads (``resid_post``, ``attn_out`` or ``mlp_out``)."""
    return site_of_hook(hook_name(sae))


def sae_layer(sae) -> int:
    """The block index of the SAE's hook (``blocks.{l}.…``)."""
    name = hook_name(sae)
    m = re.match(r"blocks\.(\d+)\.", name)
    if not m:
        raise SAEError(f"SAE hook {name!r} is not inside a block (expected blocks.<l>.<hook>)")
    return int(m.group(1))


def sae_identity(sae) -> str:
    """A human-readable identity: ``release/sae_id``, the folder, or the hook name."""
    meta = sae.cfg.metadata
    release = getattr(meta, "release", None)
    sid = getattr(meta, "sae_id", None)
    if release and sid:
        return f"{release}/{sid}"
    return str(sid or f"{getattr(meta, 'model_name', '?')}:{hook_name(sae)}")


def _norm_model_name(name: str | None) -> str:
    return (name or "").split("/")[-1].lower()


def validate_sae(
    model,
    sae,
    layer: int | None = None,
    *,
    site: str | None = None,
    check_model_name: bool = True,
) -> None:
    """Fail with a clear message when ``sae`` does not fit ``model`` (and ``layer``, ``site``).

    Checks: the hook exists in the model; ``d_in == d_model``; the layer is in range and
    matches the SAE's hook; the site (when given) matches the SAE's hook; the SAE's recorded
    model name (when both are known) matches.
    """
    name = hook_name(sae)
    ident = sae_identity(sae)
    n_layers = model.cfg.n_layers
    if layer is not None and not 0 <= layer < n_layers:
        raise SAEError(
            f"layer {layer} is out of range for {model.cfg.model_name} ({n_layers} layers: 0-{n_layers - 1})"
        )
    if name not in model.hook_dict:
        raise SAEError(
            f"SAE {ident}: hook {name!r} does not exist in {model.cfg.model_name} "
            f"(blocks 0-{n_layers - 1}; e.g. 'blocks.{n_layers // 2}.hook_resid_post')"
        )
    if layer is not None and sae_layer(sae) != layer:
        raise SAEError(
            f"SAE {ident} is trained on {name!r} but is used for layer {layer}; "
            f"use an SAE for {site_hook_name(layer, site or DEFAULT_SITE)}"
        )
    if site is not None and not name.endswith(f".hook_{check_site(site)}"):
        raise SAEError(
            f"SAE {ident} is trained on {name!r} but is used for the {site} site; "
            f"use an SAE for {site_hook_name(sae_layer(sae), site)}"
        )
    if sae.cfg.d_in != model.cfg.d_model:
        raise SAEError(
            f"SAE {ident} at {name!r}: d_in {sae.cfg.d_in} != the model's d_model "
            f"{model.cfg.d_model}; this SAE belongs to another model"
        )
    sae_model = getattr(sae.cfg.metadata, "model_name", None)
    if (
        check_model_name
        and sae_model
        and _norm_model_name(sae_model) != _norm_model_name(model.cfg.model_name)
    ):
        raise SAEError(
            f"SAE {ident} was trained on {sae_model!r}, not {model.cfg.model_name!r}; "
            "pass check_model_name=False if you know they share the residual stream"
        )


def attach_sae(model, sae, *, use_error_term: bool = True, check_model_name: bool = True):
    """Validate, move to the model's device/dtype, and splice ``sae`` into ``model``.

    Unlike ``HookedSAETransformer.add_sae`` (which only warns), a missing hook fails.
    """
    validate_sae(model, sae, check_model_name=check_model_name)
    sae = sae.to(device=model.cfg.device, dtype=model.cfg.dtype)
    model.add_sae(sae, use_error_term=use_error_term)
    return sae


def load_saes_for_layers(
    model,
    source: Mapping[int, Any] | str | os.PathLike,
    layers: list[int] | None = None,
    *,
    site: str = DEFAULT_SITE,
) -> dict[int, Any]:
    """SAEs at ``site`` keyed by layer: from a mapping of layer → SAE/path, or from a folder
    that holds one sub-folder per hook (``blocks.<l>.hook_<site>``; folders of other sites
    are left out), validated against ``model``."""
    check_site(site)
    out: dict[int, Any] = {}
    if isinstance(source, Mapping):
        items = source.items()
    else:
        root = Path(source)
        if not root.is_dir():
            raise SAEError(f"no SAE folder at {root}")
        found = {
            sae_layer_from_folder(p): p
            for p in sorted(root.iterdir())
            if (p / CFG).exists() and folder_site(p) == site
        }
        if layers is not None:
            missing = [layer for layer in layers if layer not in found]
            if missing:
                raise SAEError(
                    f"no SAE for layer(s) {missing} at {site} in {root}; available: "
                    f"{sorted(found)} (train them with `spare-tl train-saes --site {site} "
                    f"--layers {' '.join(map(str, missing))}`)"
                )
        items = found.items()
    for layer, sae in items:
        if layers is not None and layer not in layers:
            continue
        if not hasattr(sae, "encode"):
            sae = load_sae(sae)
        validate_sae(model, sae, layer, site=site)
        out[int(layer)] = sae
    return out


def load_saes_for_hooks(model, folder: str | os.PathLike, hook_names: list[str]) -> dict[str, Any]:
    """SAEs keyed by hook name from a folder with one sub-folder per hook (any site)."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(hook_names):
        site = site_of_hook(name)
        layer = int(name.split(".")[1])
        out[name] = load_saes_for_layers(model, folder, [layer], site=site)[layer]
    return out


def sae_layer_from_folder(path: Path) -> int:
    m = re.search(r"blocks\.(\d+)\.|layers?[._-]?(\d+)", Path(path).name)
    if not m:
        raise SAEError(f"cannot tell the layer of SAE folder {path}")
    return int(m.group(1) or m.group(2))


def folder_site(path: Path) -> str:
    """The site of an SAE folder named after its hook (``blocks.23.hook_attn_out``); a
    folder named otherwise (``layer_12``, a sparsify checkpoint) is taken as residual."""
    m = re.search(r"\.hook_(\w+)$", Path(path).name)
    return m.group(1) if m and m.group(1) in SITES else DEFAULT_SITE


def check_latent_code(code: str) -> str:
    """``code`` if it names a latent code, else a ValueError listing the known ones."""
    if code not in LATENT_CODES:
        raise ValueError(f"latent code must be one of {LATENT_CODES}, got {code!r}")
    return code


def is_topk(sae: Any) -> bool:
    """Whether ``sae`` selects its code with a top-k cut (SAELens TopK, sparsify)."""
    return type(getattr(sae, "activation_fn", None)).__name__ == "TopK"


@contextmanager
def _without_topk(sae: Any) -> Iterator[None]:
    """Swap the SAE's top-k activation for a ReLU inside the block (restored on exit)."""
    original = sae.activation_fn
    sae.activation_fn = torch.nn.ReLU()
    try:
        yield
    finally:
        sae.activation_fn = original


def encode_with(sae: Any, resid: Tensor, code: LatentCode | str = "encode") -> Tensor:
    """``sae``'s latent code ``code`` of ``resid`` in the SAE's dtype and device (autograd as
    the caller set it)."""
    check_latent_code(code)
    if code == "encode":
        return sae.encode(resid)
    if not is_topk(sae):
        raise ValueError(
            f"latent code 'relu_pre' (ReLU before the top-k cut) needs a TopK SAE, got "
            f"{type(sae).__name__}; use code 'encode' for JumpReLU/ReLU SAEs"
        )
    with _without_topk(sae):
        return sae.encode(resid)


def encode_latents(
    sae, resid: Float[Tensor, "... d_model"], code: LatentCode | str = "encode"
) -> Float[Tensor, "... d_sae"]:
    """SAE codes of residual activations, without gradients (see the module's latent codes:
    ``"encode"`` is the SAE's own ``encode``, post-top-k for TopK; ``"relu_pre"`` the ReLU
    pre-activations before the top-k cut)."""
    dtype = sae.W_enc.dtype
    with torch.no_grad():
        return encode_with(sae, resid.to(device=sae.W_enc.device, dtype=dtype), code)
