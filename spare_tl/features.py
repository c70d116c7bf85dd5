"""Functional features: which SAE latents drive context versus memory, and how strongly.

Selection follows SpARE (Zhao et al. 2025; ``docs/method.md``, "Selecting functional
features"): sort latents by mutual information, take the smallest k whose cumulative MI
exceeds a proportion K of the layer's total, keep the first k latents with a non-zero
expectation difference E; E > 0 marks a **context feature**, E < 0 a **memory feature**. The
functional activations z̄_C and z̄_M are the confidence-weighted mean SAE codes of the
use-context and use-memory groups.

A saved set records, per layer, the fingerprint of the SAE it was found with
(:func:`sae_fingerprint`: a hash of the weights and the cfg), and ``features.json`` lists
the size and SHA-256 of ``features.safetensors``; loading checks them, and steering refuses
an SAE whose fingerprint differs (:mod:`spare_tl.methods.spare`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spare_tl.cache import (
    MANIFEST,
    check_manifest,
    manifest,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from spare_tl.checks import finite_non_negative
from spare_tl.errors import ArgumentError, CacheError
from spare_tl.saes import (
    DEFAULT_SITE,
    check_latent_code,
    check_site,
    site_hook_name,
    site_of_hook,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TO_MEMORY_DIR = "to_memory"
FEATURES_JSON = "features.json"
FEATURES_TENSORS = "features.safetensors"

#: cfg fields that do not change what an SAE computes (where it sits, its label)
_CFG_IGNORED = ("device", "dtype", "metadata")
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def sae_fingerprint(sae: Any) -> str:
    """A hash of an SAE's weights (as float32, by parameter name) and of the cfg fields that
    change what it computes (widths, architecture, k, normalisation, hook); not of its
    device, dtype or path. Computed once per SAE until its weights change in place."""
    state = sae.state_dict()
    version = tuple(
        (k, v.data_ptr(), v._version, str(v.dtype), tuple(v.shape)) for k, v in state.items()
    )
    cached = _FINGERPRINTS.get(sae)
    if cached is not None and cached[0] == version:
        return cached[1]
    cfg = sae.cfg.to_dict() if hasattr(sae.cfg, "to_dict") else dict(vars(sae.cfg))
    cfg = {k: v for k, v in cfg.items() if k not in _CFG_IGNORED}
    cfg["hook_name"] = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    digest = h.hexdigest()[:16]
    _FINGERPRINTS[sae] = (version, digest)
    return digest


def select_functional_features(
    mutual_information: Float[Tensor, " d_sae"],
    expectation: Float[Tensor, " d_sae"],
    proportion: float,
) -> tuple[Int[Tensor, " n_context"], Int[Tensor, " n_memory"]]:
    """Latent ids of the context and memory features at cumulative-MI proportion ``proportion``.

    Returns two int64 tensors sorted by descending mutual information.
    """
    if not 0.0 < proportion <= 1.0:
        raise ValueError(
            f"proportion K must be in (0, 1], got {proportion}; the paper uses 0.01-0.10"
        )
    if mutual_information.shape != expectation.shape or mutual_information.ndim != 1:
        raise ValueError(
            "mutual_information and expectation must be 1-D of the same length, got "
            f"{tuple(mutual_information.shape)} and {tuple(expectation.shape)}"
        )
    mi = mutual_information.double().nan_to_num(0.0).clamp_min(0.0)
    total = mi.sum()
    if total <= 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    order = torch.argsort(mi, descending=True, stable=True)
    cumulative = torch.cumsum(mi[order], 0)
    # smallest k with cumulative MI > K * total (at least 1)
    k = int(torch.searchsorted(cumulative, proportion * total, right=True).item()) + 1
    k = min(k, mi.numel())
    exp_sorted = expectation[order]
    nonzero = order[exp_sorted != 0][:k]
    signs = expectation[nonzero]
    return nonzero[signs > 0].long(), nonzero[signs < 0].long()


#: How functional features are chosen: by mutual information (the paper), by attribution
#: (each latent's estimated effect on the answer toward the steering direction, see
#: :mod:`spare_tl.stages.attribution`), or both (the latents either rule picks).
SELECTIONS: tuple[str, ...] = ("mi", "attribution", "both")


def check_selection(selection: str) -> str:
    """``selection`` if it names a selection rule, else a ValueError listing them."""
    if selection not in SELECTIONS:
        raise ValueError(
            f"selection must be one of {', '.join(repr(s) for s in SELECTIONS)}, got {selection!r}"
        )
    return selection


def check_proportion(value: Any, name: str = "proportion K") -> float:
    """``value`` as a float if it lies in (0, 1] (NaN is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ArgumentError(f"{name} must be in (0, 1], got {value!r}; the paper uses 0.01-0.10")
    return float(value)


@dataclass(frozen=True)
class DirectionSetting:
    """How one steering direction edits: at ``site`` of ``layers`` (empty: every candidate
    layer), the features chosen by ``selection`` at proportion K, on the SAE code
    ``latent_code``, added with edit strength α. Checked once, here, when it is made.

    The config holds one per direction, a feature set reports one per direction
    (:meth:`FunctionalFeatures.setting`), and the sweep and the baselines table record them.
    """

    site: str = DEFAULT_SITE
    layers: tuple[int, ...] = ()
    proportion: float = 0.05
    edit_strength: float = 2.0
    selection: str = "mi"
    latent_code: str = "encode"

    #: the keys a config table or a sweep record may set (the latent code is the statistics')
    KEYS = ("site", "layers", "proportion", "edit_strength", "selection")

    def __post_init__(self) -> None:
        check_site(self.site)
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple)):
            raise ArgumentError(f"layers must be a list of layer numbers, got {self.layers!r}")
        bad = [x for x in self.layers if isinstance(x, bool) or not isinstance(x, int) or x < 0]
        if bad:
            raise ArgumentError(f"layers must be layer numbers >= 0, got {list(self.layers)}")
        object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        object.__setattr__(self, "proportion", check_proportion(self.proportion))
        object.__setattr__(self, "edit_strength", finite_non_negative(self.edit_strength))
        check_selection(self.selection)
        check_latent_code(self.latent_code)

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        base: DirectionSetting | None = None,
        *,
        name: str = "setting",
    ) -> DirectionSetting:
        """A setting from a config table or a sweep record (keys :attr:`KEYS`), its unset
        fields taken from ``base`` (default: the defaults); an unknown key is an error."""
        unknown = sorted(set(values) - set(cls.KEYS))
        if unknown:
            raise ArgumentError(
                f"{name}: unknown key(s) {unknown}; a direction may set {list(cls.KEYS)}"
            )
        changes = {k: v for k, v in values.items() if v is not None}
        if "layers" in changes and isinstance(changes["layers"], list):
            changes["layers"] = tuple(changes["layers"])
        try:
            return replace(base, **changes) if base is not None else cls(**changes)
        except ArgumentError as e:
            raise ArgumentError(f"{name}: {e}") from e

    def record(self) -> dict[str, Any]:
        """The JSON form the sweep records and summaries store (without the latent code,
        which they record once)."""
        return {
            "site": self.site,
            "layers": list(self.layers),
            "proportion": self.proportion,
            "edit_strength": self.edit_strength,
            "selection": self.selection,
        }

    def same_features(self, other: DirectionSetting) -> bool:
        """Whether ``other`` picks the same features (site, layers, K, MI selection, code),
        so that one set can serve both directions with an α each."""
        return self.selection == other.selection == "mi" and (
            self.site,
            self.layers,
            self.proportion,
            self.latent_code,
        ) == (other.site, other.layers, other.proportion, other.latent_code)


def select_by_attribution(
    attribution: Float[Tensor, " d_sae"],
    expectation: Float[Tensor, " d_sae"],
    proportion: float,
) -> tuple[Int[Tensor, " n_context"], Int[Tensor, " n_memory"]]:
    """Latent ids of the context and memory features chosen by attribution at proportion K:
    the MI rule with the mean attribution toward the steering direction in place of MI.

    Sort latents by attribution, descending; take the smallest k whose cumulative positive
    attribution exceeds K of the layer's total positive attribution; keep the first k latents
    with positive attribution and E ≠ 0, E > 0 a context feature and E < 0 a memory feature
    (so the edit adds the ones the steering direction's group has more of and removes the
    others). Returns two int64 tensors sorted by descending attribution.
    """
    if attribution.shape != expectation.shape or attribution.ndim != 1:
        raise ValueError(
            "attribution and expectation must be 1-D of the same length, got "
            f"{tuple(attribution.shape)} and {tuple(expectation.shape)}"
        )
    positive = attribution.double().nan_to_num(0.0).clamp_min(0.0)
    # a latent whose move would not help is never chosen, however far the walk goes
    return select_functional_features(
        positive, torch.where(positive > 0, expectation, 0), proportion
    )


def select_features(
    selection: str,
    proportion: float,
    mutual_information: Float[Tensor, " d_sae"],
    expectation: Float[Tensor, " d_sae"],
    attribution: Float[Tensor, " d_sae"] | None = None,
) -> tuple[Int[Tensor, " n_context"], Int[Tensor, " n_memory"]]:
    """The context and memory features of one layer by ``selection`` (:data:`SELECTIONS`)
    at proportion K; ``attribution`` (toward the steering direction) for the last two.
    ``"both"``: the union of the MI and the attribution features, MI's first."""
    check_selection(selection)
    if selection == "mi":
        return select_functional_features(mutual_information, expectation, proportion)
    if attribution is None:
        raise ValueError(f"selection {selection!r} needs the latents' attribution")
    by_attr = select_by_attribution(attribution, expectation, proportion)
    if selection == "attribution":
        return by_attr
    by_mi = select_functional_features(mutual_information, expectation, proportion)
    return tuple(  # type: ignore[return-value]
        torch.cat([m, a[~torch.isin(a, m)]]) for m, a in zip(by_mi, by_attr)
    )


def confidence_weighted_mean(
    codes: Float[Tensor, "n d_sae"], weights: Float[Tensor, " n"]
) -> Float[Tensor, " d_sae"]:
    """Σ_j w_j z_j with the weights normalised to sum to one."""
    if codes.shape[0] == 0:
        raise ValueError("cannot average an empty behaviour group: collect more prompts")
    w = weights.to(torch.float64).clamp_min(0)
    w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))
    return (w[:, None] * codes.to(torch.float64)).sum(0).to(codes.dtype)


@dataclass
class LayerFeatures:
    """SpARE's functional features at one layer."""

    layer: int
    hook_name: str
    context_features: Int[Tensor, " n_context"]
    memory_features: Int[Tensor, " n_memory"]
    context_activations: Float[Tensor, " d_sae"]  # z̄_C
    memory_activations: Float[Tensor, " d_sae"]  # z̄_M
    sae_id: str = ""
    latent_code: str = "encode"  # which SAE code the statistics and the edit use (spare_tl.saes)
    sae_fingerprint: str = ""  # sae_fingerprint() of the SAE the features were found with

    @property
    def d_sae(self) -> int:
        return int(self.context_activations.shape[0])

    def __post_init__(self) -> None:
        check_latent_code(self.latent_code)
        self.context_features = torch.as_tensor(self.context_features, dtype=torch.long)
        self.memory_features = torch.as_tensor(self.memory_features, dtype=torch.long)
        if self.context_activations.shape != self.memory_activations.shape:
            raise ValueError(f"layer {self.layer}: z̄_C and z̄_M have different shapes")
        for name, idx in (("context", self.context_features), ("memory", self.memory_features)):
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.d_sae):
                raise ValueError(
                    f"layer {self.layer}: {name} feature ids out of range [0, {self.d_sae})"
                )


@dataclass
class FunctionalFeatures:
    """A saved set of functional features across layers, with what produced them."""

    model_name: str
    layers: dict[int, LayerFeatures]
    proportion: float
    edit_strength: float = 1.0
    edit_strength_to_memory: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: A separate set (its own layers, K and α) for steering to memory, when the two
    #: directions were tuned apart; None: this set steers both ways. (The paper's Gemma-2-9B
    #: code steers to context at layers 23-26 and to memory at 23-25 + 29-31.)
    to_memory: FunctionalFeatures | None = None

    def __post_init__(self) -> None:
        # the same checks as DirectionSetting's (one helper each), on the stored fields
        finite_non_negative(self.edit_strength)
        if self.edit_strength_to_memory is not None:
            finite_non_negative(self.edit_strength_to_memory, "edit strength α to memory")
        check_proportion(self.proportion)
        mem = self.to_memory
        if mem is not None:
            if mem.to_memory is not None:
                raise ValueError("to_memory must be a plain feature set (no to_memory of its own)")
            if mem.model_name != self.model_name:
                raise ValueError(
                    f"to_memory is for {mem.model_name!r}, this set for {self.model_name!r}"
                )
            if mem.layers and self.layers and mem.latent_code != self.latent_code:
                raise ValueError(
                    f"to_memory uses the {mem.latent_code!r} code, this set {self.latent_code!r}"
                )

    def setting(self, direction: str) -> DirectionSetting:
        """The :class:`DirectionSetting` steering to ``direction`` uses: its set's site,
        layers, K, selection and latent code, with the α for that direction."""
        f = self.for_direction(direction)
        return DirectionSetting(
            site=f.site,
            layers=tuple(f.layers),
            proportion=f.proportion,
            edit_strength=self.strength(direction),
            selection=f.metadata.get("selection", "mi"),
            latent_code=f.latent_code,
        )

    def for_direction(self, direction: str) -> FunctionalFeatures:
        """The set that steers to ``direction``: :attr:`to_memory` for memory when it is
        set, this set otherwise."""
        if direction == "memory" and self.to_memory is not None:
            return self.to_memory
        return self

    def edit_layers(self, direction: str) -> list[int]:
        """The layers steering to ``direction`` edits."""
        return sorted(self.for_direction(direction).layers)

    def with_edit_strength(self, edit_strength: float) -> FunctionalFeatures:
        """A copy that steers both ways (and its :attr:`to_memory` set) with ``edit_strength``."""
        mem = self.to_memory.with_edit_strength(edit_strength) if self.to_memory else None
        return replace(
            self, edit_strength=edit_strength, edit_strength_to_memory=None, to_memory=mem
        )

    @property
    def all_layers(self) -> list[int]:
        """Every layer either direction edits (the layers whose SAEs steering needs)."""
        mem = self.to_memory.layers if self.to_memory is not None else {}
        return sorted(set(self.layers) | set(mem))

    def last_probe_layer(self, direction: str) -> int:
        """The deepest layer whose residual a conflict probe may read before steering to
        ``direction`` edits: the first edited layer for a residual edit, the one before it
        for an attention/MLP edit (made inside that block)."""
        f = self.for_direction(direction)
        first = min(f.layers)
        return first if f.site == DEFAULT_SITE else first - 1

    @property
    def hook_names(self) -> list[str]:
        """The hook of every layer either direction edits (the SAEs steering needs)."""
        sets = [self] + ([self.to_memory] if self.to_memory is not None else [])
        return sorted(
            {f.hook_name or site_hook_name(f.layer) for s in sets for f in s.layers.values()},
            key=lambda h: (int(h.split(".")[1]), h),
        )

    @property
    def site(self) -> str:
        """Where this set edits: ``resid_post`` (the residual), ``attn_out`` or ``mlp_out``."""
        sites = {
            site_of_hook(f.hook_name) if f.hook_name else DEFAULT_SITE for f in self.layers.values()
        }
        if len(sites) > 1:
            raise ValueError(f"the set mixes sites {sorted(sites)}; use one site per set")
        return sites.pop() if sites else DEFAULT_SITE

    def strength(self, direction: str) -> float:
        """α for ``direction`` ('context' or 'memory')."""
        if direction == "memory" and self.to_memory is not None:
            return self.to_memory.strength("memory")
        if direction == "memory" and self.edit_strength_to_memory is not None:
            return self.edit_strength_to_memory
        return self.edit_strength

    @property
    def latent_code(self) -> str:
        """The latent code of the set ("encode" or "relu_pre"; see :mod:`spare_tl.saes`)."""
        codes = {f.latent_code for f in self.layers.values()}
        if len(codes) > 1:
            raise ValueError(f"layers use different latent codes: {sorted(codes)}")
        return codes.pop() if codes else "encode"

    def counts(self) -> dict[int, tuple[int, int]]:
        """(context features, memory features) per layer."""
        return {
            layer: (int(f.context_features.numel()), int(f.memory_features.numel()))
            for layer, f in sorted(self.layers.items())
        }

    def describe(self, direction: str) -> str:
        """One line on what steering to ``direction`` edits (site, layers, K, α, features)."""
        f = self.for_direction(direction)
        return (
            f"{f.site} of layers {sorted(f.layers)}, K = {f.proportion}, "
            f"α = {self.strength(direction)}, SAE code {f.latent_code!r}, "
            f"(context, memory) features per layer {f.counts()}"
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``features.safetensors`` + ``features.json`` into ``directory`` (and
        :attr:`to_memory`, if set, into its ``to_memory/`` subfolder, written first).

        ``features.json`` goes first out and last in: removed before anything is written,
        written at the end with the manifest of ``features.safetensors``; a crash in
        between leaves a folder that does not load, never a mixed set."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(
                f"{directory} is an existing file; give a folder for the feature set"
            )
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FEATURES_JSON).unlink(missing_ok=True)
        sub = directory / TO_MEMORY_DIR
        if self.to_memory is not None:
            self.to_memory.save(sub)
        tensors: dict[str, Tensor] = {}
        layer_meta = {}
        for layer, f in self.layers.items():
            tensors[f"layer{layer}.context_features"] = f.context_features
            tensors[f"layer{layer}.memory_features"] = f.memory_features
            tensors[f"layer{layer}.context_activations"] = f.context_activations.float()
            tensors[f"layer{layer}.memory_activations"] = f.memory_activations.float()
            layer_meta[str(layer)] = {
                "hook_name": f.hook_name,
                "sae_id": f.sae_id,
                "latent_code": f.latent_code,
                "sae_fingerprint": f.sae_fingerprint,
            }
        write_tensors(directory / FEATURES_TENSORS, tensors)
        write_json(
            directory / FEATURES_JSON,
            {
                "format_version": FORMAT_VERSION,
                "model_name": self.model_name,
                "proportion": self.proportion,
                "edit_strength": self.edit_strength,
                "edit_strength_to_memory": self.edit_strength_to_memory,
                "layers": layer_meta,
                "counts": {str(k): list(v) for k, v in self.counts().items()},
                "to_memory": TO_MEMORY_DIR if self.to_memory is not None else None,
                "metadata": self.metadata,
                MANIFEST: manifest(directory, [FEATURES_TENSORS]),
            },
        )
        if self.to_memory is None and sub.exists():
            shutil.rmtree(sub)  # a stale set from an earlier save
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, _nested: bool = False) -> FunctionalFeatures:
        """Load a saved set; its files are checked against the manifest in features.json,
        and a malformed features.json is a :class:`~spare_tl.errors.CacheError` naming it."""
        directory = Path(directory)
        meta_path = directory / FEATURES_JSON
        if directory.is_file():
            raise CacheError(
                f"{directory} is a file; pass the folder holding {FEATURES_JSON} and "
                f"{FEATURES_TENSORS}"
            )
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no functional-feature set in {directory} ({FEATURES_JSON} missing); "
                "create one with `spare-tl features` or `spare-tl import-original`"
            )
        meta = read_json(meta_path)
        try:
            return cls._from_meta(directory, meta, nested=_nested)
        except CacheError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CacheError(
                f"{meta_path} is malformed ({type(e).__name__}: {e}); re-create the set with "
                "`spare-tl features` or `spare-tl import-original`"
            ) from e

    @classmethod
    def _from_meta(cls, directory: Path, meta: dict[str, Any], nested: bool) -> FunctionalFeatures:
        meta_path = directory / FEATURES_JSON
        if MANIFEST in meta:
            check_manifest(directory, meta[MANIFEST], meta_path)
        else:
            logger.warning(
                "%s has no file manifest (written by an older spare-tl): its tensors are not "
                "checked; save the set again to add one",
                meta_path,
            )
        to_memory = None
        if meta.get("to_memory"):
            if nested:
                raise CacheError(
                    f"{meta_path}: a to_memory set cannot have a to_memory set of its own"
                )
            if meta["to_memory"] != TO_MEMORY_DIR:
                raise CacheError(
                    f"{meta_path}: to_memory must be {TO_MEMORY_DIR!r} (the subfolder), got "
                    f"{meta['to_memory']!r}"
                )
            to_memory = cls.load(directory / TO_MEMORY_DIR, _nested=True)
        tensors = read_tensors(directory / FEATURES_TENSORS)
        layers = {}
        for key, info in meta["layers"].items():
            layer = int(key)
            layers[layer] = LayerFeatures(
                layer=layer,
                hook_name=info["hook_name"],
                sae_id=info.get("sae_id", ""),
                latent_code=info.get("latent_code", "encode"),
                sae_fingerprint=info.get("sae_fingerprint", ""),
                context_features=tensors[f"layer{layer}.context_features"],
                memory_features=tensors[f"layer{layer}.memory_features"],
                context_activations=tensors[f"layer{layer}.context_activations"],
                memory_activations=tensors[f"layer{layer}.memory_activations"],
            )
        return cls(
            model_name=meta["model_name"],
            layers=layers,
            proportion=meta["proportion"],
            edit_strength=meta["edit_strength"],
            edit_strength_to_memory=meta.get("edit_strength_to_memory"),
            metadata=meta.get("metadata", {}),
            to_memory=to_memory,
        )
