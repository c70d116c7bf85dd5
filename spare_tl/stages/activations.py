"""Stages 2-4: residual activations, feature statistics, functional features.

* **Activations**: the residual stream ``blocks.{l}.hook_resid_post`` at the last prompt
  position of every kept grouped prompt, for the chosen layers, in one forward pass that
  stops after the deepest one (``stop_at_layer``).
* **Feature statistics** per layer: SAE codes (``latent_code``: the SAE's own ``encode``,
  or for TopK SAEs the ReLU code before the top-k cut), mutual information with the behaviour label (k-NN estimator, 3 neighbours, on
  min-max-normalised codes), the expectation difference E, and the confidence-weighted
  mean codes z̄_C and z̄_M.
* **Functional features**: selection at proportion K (see :mod:`spare_tl.features`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.bridge import is_bridge
from spare_tl.errors import CacheError
from spare_tl.features import (
    DirectionSetting,
    FunctionalFeatures,
    LayerFeatures,
    confidence_weighted_mean,
    sae_fingerprint,
    select_features,
)
from spare_tl.generation import PromptPrefix, _tokenize, left_pad
from spare_tl.mutual_info import expectation_difference, mutual_information
from spare_tl.saes import (
    DEFAULT_SITE,
    check_latent_code,
    check_site,
    encode_latents,
    hook_name,
    sae_identity,
    site_hook_name,
    validate_sae,
)
from spare_tl.stages.behaviours import GroupedPrompts, require_groups

if TYPE_CHECKING:
    from spare_tl.stages.attribution import LayerAttribution

logger = logging.getLogger(__name__)


def check_layers(model, layers: Sequence[int]) -> list[int]:
    """Sorted unique layers, each inside the model; a clear error otherwise."""
    if not layers:
        raise ValueError("no layers given: pass at least one layer, e.g. --layers 10 11 12")
    bad = [layer for layer in layers if not 0 <= int(layer) < model.cfg.n_layers]
    if bad:
        raise ValueError(
            f"layer(s) {bad} are outside {model.cfg.model_name}, which has "
            f"{model.cfg.n_layers} layers (0-{model.cfg.n_layers - 1})"
        )
    return sorted({int(layer) for layer in layers})


@torch.no_grad()
def last_position_activations(
    model,
    prompts: Sequence[str],
    hook_names: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
    shared_demonstrations: bool = True,
) -> dict[str, Float[Tensor, "n d"]]:
    """The activation at each hook point at the last prompt position, one pass per batch
    (stopping after the deepest block asked for). A token prefix every prompt shares (one
    demonstration set) is run once and each batch continues from its KV cache
    (:class:`~spare_tl.generation.PromptPrefix`; ``shared_demonstrations=False``: not)."""
    names = set(hook_names)
    missing = sorted(n for n in names if n not in model.hook_dict)
    if missing:
        raise ValueError(f"the model has no hook point(s) {missing}")
    depth = [int(n.split(".")[1]) for n in names if n.startswith("blocks.")]
    stop = max(depth) + 1 if depth and len(depth) == len(names) else None
    if not prompts:
        return {name: torch.zeros(0, model.cfg.d_model) for name in names}
    full = _tokenize(model, prompts)
    # the bridge's KV-cache forward runs every layer; a prefix pays off only when stopping
    prefix = PromptPrefix.of(model, full, enabled=shared_demonstrations and not is_bridge(model))
    token_lists = prefix.own(full)
    order = sorted(range(len(prompts)), key=lambda i: len(token_lists[i]))
    out: dict[str, Tensor] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="activations", disable=not progress, leave=False):
        tokens, mask = left_pad(model, [token_lists[i] for i in batch], extra=prefix.length)
        extra = {"past_kv_cache": prefix.cache(model, len(batch))} if prefix.length else {}
        _, store = model.run_with_cache(
            tokens,
            attention_mask=mask,
            padding_side="left",
            names_filter=lambda n: n in names,
            stop_at_layer=stop,
            **extra,
        )
        for name in names:
            last = store[name][:, -1].float().cpu()
            if name not in out:
                out[name] = torch.zeros(len(prompts), last.shape[-1])
            out[name][batch] = last
    return out


def last_position_resid(
    model,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    site: str = DEFAULT_SITE,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, Float[Tensor, "n d_model"]]:
    """The activation at ``site`` of each layer (default: the residual after it) at the last
    prompt position, one pass per batch."""
    layers = check_layers(model, layers)
    acts = last_position_activations(
        model,
        prompts,
        [site_hook_name(layer, site) for layer in layers],
        batch_size=batch_size,
        progress=progress,
    )
    return {layer: acts[site_hook_name(layer, site)] for layer in layers}


def stage_name(stage: str, site: str = DEFAULT_SITE) -> str:
    """The cache folder of a per-site stage: ``stage`` for the residual, ``stage_<site>``
    for another site (``activations_attn_out``)."""
    return stage if check_site(site) == DEFAULT_SITE else f"{stage}_{site}"


@dataclass
class Activations:
    """Last-position activations of the two behaviour groups at one site per layer (the
    residual unless ``site`` says otherwise)."""

    model_name: str
    resid: dict[int, Float[Tensor, "n d_model"]]
    labels: Int[Tensor, " n"]  # 1 context, 0 memory
    weights: Float[Tensor, " n"]  # confidence weights
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> str:
        return str(self.config.get("hook", "hook_" + DEFAULT_SITE)).removeprefix("hook_")

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        tensors = {f"layer{k}": v for k, v in self.resid.items()}
        tensors.update(labels=self.labels, weights=self.weights)
        cache.begin_stage(directory)
        cache.write_tensors(directory / "activations.safetensors", tensors)
        cache.mark_complete(
            directory, self.config, files=["activations.safetensors"], layers=sorted(self.resid)
        )

    @classmethod
    def load(cls, directory: Path) -> Activations:
        """Load a completed stage, its file checked against the manifest first."""
        directory = Path(directory)
        meta = cache.verify_stage(directory)
        t = cache.read_tensors(directory / "activations.safetensors")
        resid = {int(k[5:]): v for k, v in t.items() if k.startswith("layer")}
        return cls(meta["config"]["model"], resid, t["labels"], t["weights"], meta["config"])


def collect_activations(
    model,
    grouped: GroupedPrompts,
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    min_per_group: int = 2,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    site: str = DEFAULT_SITE,
) -> Activations:
    """The activations stage: last-position activations at ``site`` (default the residual) of the
    use-context and use-memory prompts (cached)."""
    layers = check_layers(model, layers)
    require_groups(grouped, min_per_group)
    prompts, labels, weights = grouped.labelled()
    config = {
        "stage": "activations",
        "model": model.cfg.model_name,
        "layers": layers,
        "grouped_hash": cache.fingerprint({"p": prompts, "l": labels.tolist()}),
        "position": "last prompt token",
        "hook": f"hook_{check_site(site)}",
        "dtype": str(model.cfg.dtype),  # bf16 and fp32 activations select different features
    }
    directory = cache.stage_dir(model.cfg.model_name, stage_name("activations", site), cache_root)
    if use_cache and cache.is_fresh(directory, config):
        return Activations.load(directory)
    resid = last_position_resid(
        model, prompts, layers, site=site, batch_size=batch_size, progress=progress
    )
    result = Activations(model.cfg.model_name, resid, labels, weights, config)
    if use_cache:
        result.save(directory)
    return result


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


def functional_features(
    statistics: Mapping[int, LayerStatistics],
    setting: DirectionSetting,
    *,
    model_name: str,
    direction: str | None = None,
    metadata: dict[str, Any] | None = None,
    attribution: Mapping[int, LayerAttribution] | None = None,
) -> FunctionalFeatures:
    """The features stage: select context/memory features per layer of ``setting`` (all of
    ``statistics``' layers when it names none) at its proportion K, by its selection
    (``"mi"``, ``"attribution"`` or ``"both"``, :data:`spare_tl.features.SELECTIONS`); the
    last two rank by ``attribution`` toward ``direction`` and give a set for that direction
    only. The set steers with the setting's α; the selection is recorded in its metadata."""
    selection = setting.selection
    if selection != "mi" and direction not in ("context", "memory"):
        raise ValueError(
            f"selection {selection!r} chooses features for one direction: pass "
            f"direction='context' or 'memory', got {direction!r}"
        )
    chosen = list(setting.layers) if setting.layers else sorted(statistics)
    missing = [layer for layer in chosen if layer not in statistics]
    if missing:
        raise ValueError(f"no statistics for layer(s) {missing}; have {sorted(statistics)}")
    codes = {statistics[layer].latent_code for layer in chosen}
    if codes - {setting.latent_code}:
        raise ValueError(
            f"the setting asks for the {setting.latent_code!r} code but the statistics of "
            f"layers {chosen} hold {sorted(codes)}; set latent_code to match and rerun "
            "`spare-tl statistics`"
        )
    per_layer = {}
    for layer in chosen:
        s = statistics[layer]
        attr = None
        if selection != "mi":
            attr = _attribution_of(attribution, s, layer).toward(direction)  # type: ignore[arg-type]
        ctx, mem = select_features(
            selection, setting.proportion, s.mutual_information, s.expectation, attr
        )
        per_layer[layer] = LayerFeatures(
            layer=layer,
            hook_name=s.hook_name,
            sae_id=s.sae_id,
            context_features=ctx,
            memory_features=mem,
            context_activations=s.context_activations,
            memory_activations=s.memory_activations,
            latent_code=s.latent_code,
            sae_fingerprint=s.sae_fingerprint,
        )
    return FunctionalFeatures(
        model_name=model_name,
        layers=per_layer,
        proportion=setting.proportion,
        edit_strength=setting.edit_strength,
        metadata={**(metadata or {}), "selection": selection},
    )


def _attribution_of(
    attribution: Mapping[int, LayerAttribution] | None, stats: LayerStatistics, layer: int
) -> LayerAttribution:
    """Layer ``layer``'s attribution, checked to come from the statistics' SAE and code."""
    if not attribution or layer not in attribution:
        raise ValueError(
            f"no attribution for layer {layer}: run the attribution stage "
            "(`spare-tl attribution CONFIG`) for it first"
        )
    a = attribution[layer]
    if (a.sae_fingerprint, a.latent_code) != (stats.sae_fingerprint, stats.latent_code):
        raise ValueError(
            f"layer {layer}: the attribution was computed with another SAE or latent code "
            f"than the statistics ({a.sae_fingerprint}/{a.latent_code} vs "
            f"{stats.sae_fingerprint}/{stats.latent_code}); rerun `spare-tl attribution`"
        )
    return a


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


def directional_features(
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    *,
    model_name: str,
    context: DirectionSetting,
    memory: DirectionSetting,
    metadata: dict[str, Any] | None = None,
    attribution: Mapping[str, Mapping[int, LayerAttribution]] | None = None,
) -> FunctionalFeatures:
    """The feature set steering to context with ``context`` and to memory with ``memory``
    (``statistics`` per layer, or by site then layer; ``attribution`` by site then layer,
    needed for a selection other than ``"mi"``).

    When both pick the same features (:meth:`DirectionSetting.same_features`), one set with
    an α per direction; otherwise the context set carries a separate
    :attr:`~FunctionalFeatures.to_memory` set.
    """

    def feature_set(setting: DirectionSetting, direction: str) -> FunctionalFeatures:
        return functional_features(
            statistics_at(statistics, setting.site),
            setting,
            model_name=model_name,
            direction=direction,
            metadata=metadata,
            attribution=(attribution or {}).get(setting.site),
        )

    if context.same_features(memory):
        alpha_mem = memory.edit_strength
        alpha_mem = None if alpha_mem == context.edit_strength else alpha_mem
        return replace(feature_set(context, "context"), edit_strength_to_memory=alpha_mem)
    return replace(feature_set(context, "context"), to_memory=feature_set(memory, "memory"))


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
