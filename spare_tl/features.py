"""Functional features: which SAE latents drive context versus memory, and how strongly.

Selection follows SpARE (Zhao et al. 2025, §2.5 of ``docs``): sort latents by mutual
information, take the smallest k whose cumulative MI exceeds a proportion K of the layer's
total, keep the first k latents with a non-zero expectation difference E; E > 0 marks a
**context feature**, E < 0 a **memory feature**. The functional activations z̄_C and z̄_M are
the confidence-weighted mean SAE codes of the use-context and use-memory groups.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spare_tl.cache import read_json, read_tensors, write_json, write_tensors
from spare_tl.saes import check_latent_code

FORMAT_VERSION = 1
TO_MEMORY_DIR = "to_memory"


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
        if self.edit_strength < 0 or (
            self.edit_strength_to_memory is not None and self.edit_strength_to_memory < 0
        ):
            raise ValueError("edit strength α must be >= 0")
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

    def save(self, directory: str | Path) -> Path:
        """Write ``features.safetensors`` + ``features.json`` into ``directory`` (and
        :attr:`to_memory`, if set, into its ``to_memory/`` subfolder, written first)."""
        directory = Path(directory)
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
            }
        write_tensors(directory / "features.safetensors", tensors)
        write_json(
            directory / "features.json",
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
            },
        )
        if self.to_memory is None and sub.exists():
            shutil.rmtree(sub)  # a stale set from an earlier save
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FunctionalFeatures:
        directory = Path(directory)
        meta_path = directory / "features.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no functional-feature set in {directory} (features.json missing); "
                "create one with `spare-tl features` or `spare-tl import-original`"
            )
        try:
            meta = read_json(meta_path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
        tensors = read_tensors(directory / "features.safetensors")
        layers = {}
        for key, info in meta["layers"].items():
            layer = int(key)
            layers[layer] = LayerFeatures(
                layer=layer,
                hook_name=info["hook_name"],
                sae_id=info.get("sae_id", ""),
                latent_code=info.get("latent_code", "encode"),
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
            to_memory=cls.load(directory / meta["to_memory"]) if meta.get("to_memory") else None,
        )
