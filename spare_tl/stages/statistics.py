"""Stage 3, feature statistics per layer: SAE codes (``latent_code``: the SAE's own
``encode``, or for TopK SAEs the ReLU code before the top-k cut), mutual information with
the behaviour label (k-NN estimator, 3 neighbours, on min-max-normalised codes), the
expectation difference E, and the confidence-weighted mean codes z̄_C and z̄_M. Cached
under ``cache_data/<model>/mutual_information[_<site>]/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.errors import CacheError
from spare_tl.features import (
    confidence_weighted_mean,
    sae_fingerprint,
)
from spare_tl.mutual_info import expectation_difference, mutual_information
from spare_tl.saes import (
    DEFAULT_SITE,
    check_latent_code,
    check_site,
    encode_latents,
    hook_name,
    sae_identity,
    validate_sae,
)
from spare_tl.stages.activations import Activations, stage_name


@dataclass
class LayerStatistics:
    """Per-latent statistics of one layer's SAE over the two behaviour groups."""

    layer: int
    hook_name: str
    sae_id: str
    mutual_information: Float[Tensor, " d_sae"]
    expectation: Float[Tensor, " d_sae"]
    context_activations: Float[Tensor, " d_sae"]  # z̄_C
    memory_activations: Float[Tensor, " d_sae"]  # z̄_M
    n_context: int
    n_memory: int
    latent_code: str = "encode"  # the SAE code the statistics were computed on
    sae_fingerprint: str = ""  # spare_tl.features.sae_fingerprint of the SAE

    def save(self, directory: Path, config: dict[str, Any] | None = None) -> None:
        """Write ``layer<L>.safetensors`` as a completed stage: ``config.json`` last, with
        ``config`` (the stage config :func:`feature_statistics` keys the cache by; a
        standalone save records what the file holds and is loadable, never reused)."""
        directory = Path(directory)
        name = f"layer{self.layer}.safetensors"
        config = config or {
            "stage": "mutual_information",
            "layer": self.layer,
            "sae": self.sae_id,
            "sae_fingerprint": self.sae_fingerprint,
            "latent_code": self.latent_code,
            "saved": "standalone",
        }
        cache.begin_stage(directory)
        cache.write_tensors(
            directory / name,
            {
                "mutual_information": self.mutual_information,
                "expectation": self.expectation,
                "context_activations": self.context_activations,
                "memory_activations": self.memory_activations,
            },
            metadata={
                "layer": str(self.layer),
                "hook_name": self.hook_name,
                "sae_id": self.sae_id,
                "n_context": str(self.n_context),
                "n_memory": str(self.n_memory),
                "latent_code": self.latent_code,
                "sae_fingerprint": self.sae_fingerprint,
            },
        )
        cache.mark_complete(directory, config, files=[name])

    @classmethod
    def load(cls, path: Path) -> LayerStatistics:
        """Load one layer's file, checked against its stage manifest first. Statistics
        saved before SAE fingerprints take the one their stage config records."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        cache.verify_file(path)
        stage = cache.read_json(path.parent / cache.CONFIG)["config"]
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                t = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise CacheError(f"{path} is not a readable safetensors file ({e})") from e
        return cls(
            layer=int(meta["layer"]),
            hook_name=meta["hook_name"],
            sae_id=meta["sae_id"],
            n_context=int(meta["n_context"]),
            n_memory=int(meta["n_memory"]),
            latent_code=meta.get("latent_code", "encode"),
            sae_fingerprint=meta.get("sae_fingerprint") or stage.get("sae_fingerprint", ""),
            **t,
        )


def layer_statistics(
    codes: Float[Tensor, "n d_sae"],
    labels: Int[Tensor, " n"],
    weights: Float[Tensor, " n"],
    *,
    layer: int,
    hook: str,
    sae_id: str,
    seed: int = 0,
    latent_code: str = "encode",
    sae_fingerprint: str = "",
    progress: bool = False,
) -> LayerStatistics:
    """MI, E and the confidence-weighted group means from one layer's SAE codes."""
    ctx, mem = labels == 1, labels == 0
    return LayerStatistics(
        layer=layer,
        hook_name=hook,
        sae_id=sae_id,
        mutual_information=mutual_information(codes, labels, seed=seed, progress=progress).float(),
        expectation=expectation_difference(codes, labels).float(),
        context_activations=confidence_weighted_mean(codes[ctx], weights[ctx]).float(),
        memory_activations=confidence_weighted_mean(codes[mem], weights[mem]).float(),
        n_context=int(ctx.sum()),
        n_memory=int(mem.sum()),
        latent_code=latent_code,
        sae_fingerprint=sae_fingerprint,
    )


def feature_statistics(
    model,
    activations: Activations,
    saes: Mapping[int, Any],
    *,
    seed: int = 0,
    latent_code: str = "encode",
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[int, LayerStatistics]:
    """The statistics stage: per-layer statistics (cached per layer under ``mutual_information/``) on the
    SAE code ``latent_code`` (``"encode"`` or ``"relu_pre"``, see :mod:`spare_tl.saes`)."""
    check_latent_code(latent_code)
    site = activations.site
    directory = cache.stage_dir(
        model.cfg.model_name, stage_name("mutual_information", site), cache_root
    )
    out: dict[int, LayerStatistics] = {}
    for layer in tqdm(sorted(saes), desc="feature statistics", disable=not progress):
        if layer not in activations.resid:
            raise ValueError(
                f"no activations for layer {layer}; collected layers: {sorted(activations.resid)}"
            )
        sae = saes[layer]
        validate_sae(model, sae, layer, site=site)
        config = {
            "stage": "mutual_information",
            "layer": layer,
            "sae": sae_identity(sae),
            "sae_hash": cache.fingerprint(
                {"w": float(sae.W_enc.detach().double().sum()), "d": sae.cfg.d_sae}
            ),
            "activations": activations.config.get("grouped_hash"),
            "activations_dtype": activations.config.get("dtype"),
            "estimator": "kNN (Ross 2014), 3 neighbours, min-max normalised",
            "seed": seed,
            "latent_code": latent_code,
            "sae_fingerprint": sae_fingerprint(sae),
        }
        layer_dir = directory / f"layer{layer}"
        if use_cache and cache.is_fresh(layer_dir, config):
            out[layer] = LayerStatistics.load(layer_dir / f"layer{layer}.safetensors")
            continue
        codes = encode_latents(sae, activations.resid[layer], latent_code).float().cpu()
        stats = layer_statistics(
            codes,
            activations.labels,
            activations.weights,
            layer=layer,
            hook=hook_name(sae),
            sae_id=sae_identity(sae),
            seed=seed,
            latent_code=latent_code,
            sae_fingerprint=config["sae_fingerprint"],
        )
        if use_cache:
            stats.save(layer_dir, config)
        out[layer] = stats
    return out


def statistics_at(
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    site: str = DEFAULT_SITE,
) -> Mapping[int, LayerStatistics]:
    """The per-layer statistics at ``site`` from per-layer statistics (the residual's) or
    from statistics by site (``{"resid_post": {...}, "attn_out": {...}}``)."""
    check_site(site)
    if statistics and all(isinstance(k, str) for k in statistics):
        by_site: Mapping[str, Mapping[int, LayerStatistics]] = statistics  # type: ignore[assignment]
        if site not in by_site:
            raise ValueError(
                f"no statistics at site {site!r} (have {sorted(by_site)}); add its layers to "
                "the config's site_layers and rerun `spare-tl statistics`"
            )
        return by_site[site]
    if site != DEFAULT_SITE:
        raise ValueError(f"statistics for site {site!r} needed, only residual ones given")
    return statistics  # type: ignore[return-value]


def find_statistics(
    model_name: str | None = None,
    layer: int | None = None,
    *,
    site: str = DEFAULT_SITE,
    root: str | Path | None = None,
) -> LayerStatistics | dict[int, LayerStatistics]:
    """Saved feature statistics (MI, E, z̄_C, z̄_M) of ``model_name`` (default: the embedded
    model) at ``site``: one
    layer's, or every saved layer's by layer when ``layer`` is None. Looks in ``root``, else
    the writable cache, then the shipped data of the embedded model."""
    from spare_tl.embedded import EMBEDDED_MODEL, SHIPPED_ROOT

    model_name = model_name or EMBEDDED_MODEL
    roots = [Path(root)] if root is not None else [cache.default_cache_root(), SHIPPED_ROOT]
    stage = stage_name("mutual_information", site)
    for base in roots:
        directory = cache.stage_dir(model_name, stage, base)
        found = {
            int(p.parent.name[len("layer") :]): p
            for p in directory.glob("layer*/layer*.safetensors")
        }
        if not found:
            continue
        if layer is None:
            return {k: LayerStatistics.load(p) for k, p in sorted(found.items())}
        if layer in found:
            return LayerStatistics.load(found[layer])
    where = ", ".join(str(cache.stage_dir(model_name, stage, Path(b))) for b in roots)
    raise FileNotFoundError(
        f"no saved statistics for {model_name!r} at {site}"
        + (f" layer {layer}" if layer is not None else "")
        + f" under {where}; run `spare-tl statistics CONFIG` first"
    )
