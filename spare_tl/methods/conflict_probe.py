"""Conditional steering's gate: a linear conflict probe decides which rows SpARE edits.

:class:`ConflictProbe` is the probe (a standardised linear read-out of the residual stream
after one layer; fitted by :func:`spare_tl.studies.probe_training.fit_conflict_probe`).
:class:`ConflictGate` runs it at its layer on the last prompt position during the prompt pass
and remembers the rows it flags; ``steer(..., when="conflict")`` edits only those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from spare_tl import cache
from spare_tl.methods.hooks import LastPromptPosition, resid_post_hook_name

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.hook_points import HookPoint

__all__ = ["ConflictGate", "ConflictProbe", "GateStats", "validate_probe"]


@dataclass
class ConflictProbe:
    """A linear conflict detector on ``blocks.{layer}.hook_resid_post`` at the last prompt
    position: p(conflict) = σ(((h − mean) / scale) · weight + bias), flagged when
    p ≥ ``threshold``."""

    layer: int
    weight: Float[Tensor, " d_model"]
    bias: float
    mean: Float[Tensor, " d_model"]
    scale: Float[Tensor, " d_model"]
    threshold: float = 0.5
    C: float | None = None
    model_name: str = ""

    def __post_init__(self) -> None:
        self.weight = torch.as_tensor(self.weight, dtype=torch.float32).reshape(-1)
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1)
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32).reshape(-1)
        if not (self.weight.shape == self.mean.shape == self.scale.shape):
            raise ValueError("weight, mean and scale must have the same length (d_model)")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if bool((self.scale <= 0).any()):
            raise ValueError("scale must be positive")

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hook_name(self) -> str:
        return resid_post_hook_name(self.layer)

    def logits(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """The probe's logit of 'conflict' (float32, on ``resid``'s device)."""
        if resid.shape[-1] != self.d_model:
            raise ValueError(
                f"the probe reads {self.d_model}-wide residuals, got width {resid.shape[-1]}"
            )
        dev = resid.device
        x = (resid.float() - self.mean.to(dev)) / self.scale.to(dev)
        return x @ self.weight.to(dev) + self.bias

    def probability(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        return torch.sigmoid(self.logits(resid))

    def predict(self, resid: Float[Tensor, "*batch d_model"]) -> Bool[Tensor, "*batch"]:
        """True where the probe flags a knowledge conflict."""
        return self.probability(resid) >= self.threshold

    def save(self, directory: Path) -> Path:
        path = Path(directory) / "conflict_probe.safetensors"
        cache.write_tensors(
            path,
            {"weight": self.weight, "mean": self.mean, "scale": self.scale},
            metadata={
                "layer": str(self.layer),
                "bias": repr(float(self.bias)),
                "threshold": repr(float(self.threshold)),
                "C": "" if self.C is None else repr(float(self.C)),
                "model_name": self.model_name,
                "hook_name": self.hook_name,
            },
        )
        return path

    @classmethod
    def load(cls, directory: Path) -> ConflictProbe:
        from safetensors import safe_open

        path = Path(directory)
        if path.is_dir():
            path = path / "conflict_probe.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(
            layer=int(meta["layer"]),
            bias=float(meta["bias"]),
            threshold=float(meta["threshold"]),
            C=float(meta["C"]) if meta.get("C") else None,
            model_name=meta.get("model_name", ""),
            **t,
        )


@dataclass
class GateStats:
    """What the conflict probe decided (prompt passes probed, rows seen, rows flagged)."""

    prompts: int = 0
    rows: int = 0
    flagged: int = 0


@dataclass
class ConflictGate:
    """Forward hook for ``blocks.{probe.layer}.hook_resid_post`` that runs the conflict probe
    on the last prompt position of every row during each prompt pass and remembers which
    rows it flags; the edit hooks of ``steer(..., when="conflict")`` edit only those rows.

    It never changes the residual stream. KV-cache steps leave the flags alone; re-runs of
    the growing sequence without the cache keep the flags of their prompt pass.
    """

    probe: ConflictProbe
    positions: Int[Tensor, " batch"] | None = None
    stats: GateStats = field(default_factory=GateStats)
    flags: Bool[Tensor, " batch"] | None = field(default=None, init=False)
    _where: LastPromptPosition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._where = LastPromptPosition(self.positions)
        self.positions = self._where.positions

    def reset(self) -> None:
        """Forget the remembered prompt and its flags."""
        self._where.reset()
        self.flags = None

    def _is_new_prompt(self, seq: int) -> bool:
        state = self._where._state
        return self._where.positions is not None or state is None or state.prompt_len == seq

    def __call__(
        self, resid: Float[Tensor, "batch pos d_model"], hook: HookPoint | None = None
    ) -> None:
        positions = self._where(resid)
        if positions is None:
            return None
        batch = resid.shape[0]
        if self.flags is None or self.flags.numel() != batch or self._is_new_prompt(resid.shape[1]):
            rows = torch.arange(batch, device=resid.device)
            with torch.no_grad():
                flags = self.probe.predict(resid[rows, positions])
            self.flags = flags.to(torch.bool).reshape(-1)
            self.stats.prompts += 1
            self.stats.rows += batch
            self.stats.flagged += int(self.flags.sum())
        return None

    def row_mask(self, batch: int, device: torch.device) -> Bool[Tensor, " batch"]:
        """The flags of the current prompt pass (which rows to edit)."""
        if self.flags is None or self.flags.numel() != batch:
            raise RuntimeError(
                f"the conflict probe at layer {self.probe.layer} has not seen this {batch}-row "
                "prompt; it must run in the same forward before the edited layers"
            )
        return self.flags.to(device)


def validate_probe(
    model: HookedTransformer, probe: ConflictProbe, edited: Mapping[int, str]
) -> None:
    """``edited``: edited layer → its site. The probe reads the residual after its layer, so
    it may share a layer with a residual edit but must precede an attention/MLP edit."""
    layer = int(probe.layer)
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"the conflict probe reads layer {layer}, outside the model's {n_layers} layers"
        )
    width = getattr(probe, "d_model", None)
    if width is not None and int(width) != int(model.cfg.d_model):
        raise ValueError(
            f"the conflict probe reads {width}-wide residuals but the model's d_model is "
            f"{model.cfg.d_model}; train it on this model"
        )
    if edited and layer > min(edited):
        raise ValueError(
            f"the conflict probe reads layer {layer}, but SpARE edits layer {min(edited)} "
            f"first: the probe must run at or before the first edited layer (<= {min(edited)}) "
            "so that it reads the unedited residual stream and its decision is known before "
            "the first edit is made"
        )
    inside = [f"{site} {e}" for e, site in edited.items() if e == layer and site != "resid_post"]
    if inside:
        raise ValueError(
            f"the conflict probe reads the residual after layer {layer}, but SpARE edits "
            f"{inside[0]} inside that block, before the probe runs: use a probe at layer "
            f"<= {layer - 1}"
        )
