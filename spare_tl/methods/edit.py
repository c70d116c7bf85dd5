"""SpARE's edit as a pure function of (residual activations, SAE, functional features, α).

- steer to **context**: remove memory features, r = min(α z̄_M, z) (at most what is active),
  and add context features, a = max(α z̄_C − z, 0) (only what is missing);
- steer to **memory**: the same with the roles of C and M swapped;
- h' = h + decode(z − r + a) − decode(z), so decoder biases cancel and the SAE's run-time
  input/output normalisation is respected.

z is the feature set's latent code (``LayerFeatures.latent_code``): the SAE's own ``encode``
or, for TopK SAEs, the ReLU pre-activations before the top-k cut (``"relu_pre"``).
``docs/method.md``, "The edit", gives the derivation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from spare_tl.features import LayerFeatures
from spare_tl.methods.hooks import Direction, check_direction
from spare_tl.saes import encode_with

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = [
    "EditStats",
    "check_strength",
    "is_noop",
    "sae_label",
    "spare_edit",
    "spare_edit_latents",
]


def check_strength(edit_strength: float) -> float:
    alpha = float(edit_strength)
    if not alpha >= 0 or alpha == float("inf"):  # also rejects NaN
        raise ValueError(
            f"edit strength α must be a finite number >= 0, got {edit_strength}; "
            "the paper uses 1.0-3.0, and 0 turns steering off"
        )
    return alpha


def _roles(features: LayerFeatures, direction: Direction) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids to remove, z̄ to remove, ids to add, z̄ to add) for ``direction``."""
    if direction == "context":
        return (
            features.memory_features,
            features.memory_activations,
            features.context_features,
            features.context_activations,
        )
    return (
        features.context_features,
        features.context_activations,
        features.memory_features,
        features.memory_activations,
    )


def is_noop(features: LayerFeatures, edit_strength: float) -> bool:
    return edit_strength == 0 or (
        features.context_features.numel() == 0 and features.memory_features.numel() == 0
    )


def spare_edit_latents(
    z: Float[Tensor, "*batch d_sae"],
    features: LayerFeatures,
    direction: Direction,
    edit_strength: float,
) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
    """The latent-space edit: ``(removed, added)``, both >= 0 and zero off the chosen features.

    ``removed`` = min(α z̄, z) on the features steered away from (clamped at 0, so a latent is
    never driven below 0), ``added`` = max(α z̄ − z, 0) on the features steered towards. The
    edited code is ``z - removed + added``.
    """
    direction = check_direction(direction)
    alpha = check_strength(edit_strength)
    if z.shape[-1] != features.d_sae:
        raise ValueError(
            f"layer {features.layer}: SAE codes have {z.shape[-1]} latents but the functional "
            f"features were found with a {features.d_sae}-latent SAE; use the SAE they came from"
        )
    remove_ids, remove_mean, add_ids, add_mean = _roles(features, direction)
    remove_ids = remove_ids.to(z.device)
    add_ids = add_ids.to(z.device)
    removed = torch.zeros_like(z)
    added = torch.zeros_like(z)
    if remove_ids.numel():
        target = alpha * remove_mean.to(device=z.device, dtype=z.dtype)[remove_ids]
        current = z[..., remove_ids]
        removed[..., remove_ids] = torch.minimum(target, current).clamp_min(0)
    if add_ids.numel():
        target = alpha * add_mean.to(device=z.device, dtype=z.dtype)[add_ids]
        current = z[..., add_ids]
        added[..., add_ids] = (target - current).clamp_min(0)
    return removed, added


@dataclass
class EditStats:
    """Running totals of what the edit did (for logging and inspection)."""

    calls: int = 0
    rows_edited: int = 0
    removed: float = 0.0  # summed latent activation taken away
    added: float = 0.0  # summed latent activation put in

    def update(self, removed: Tensor, added: Tensor, changed: Tensor) -> None:
        self.calls += 1
        self.rows_edited += int(changed.sum().item())
        self.removed += float(removed.sum().item())
        self.added += float(added.sum().item())


def _check_widths(resid: Tensor, sae: SAE, features: LayerFeatures) -> None:
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    if resid.shape[-1] != d_in:
        raise ValueError(
            f"residual stream width {resid.shape[-1]} != SAE d_in {d_in} "
            f"({sae_label(sae)}); use an SAE trained on this model's residual stream"
        )
    if features.d_sae != d_sae:
        raise ValueError(
            f"layer {features.layer}: functional features have d_sae {features.d_sae} but "
            f"{sae_label(sae)} has d_sae {d_sae}; use the SAE the features were found with"
        )


def spare_edit(
    resid: Float[Tensor, "*batch d_model"],
    sae: SAE,
    features: LayerFeatures,
    direction: Direction,
    edit_strength: float,
    stats: EditStats | None = None,
) -> Float[Tensor, "*batch d_model"]:
    """SpARE-edit residual activations: h + decode(z − r + a) − decode(z), z the SAE code of h
    (``features.latent_code``: ``sae.encode(h)`` or the pre-top-k ReLU code).

    Computed in the SAE's dtype and cast back to ``resid``'s. With α = 0 or no features, or
    in rows where the edit removes and adds nothing, ``resid`` comes back bitwise unchanged.
    ``stats``, when given, accumulates how much was removed and added.
    """
    direction = check_direction(direction)
    alpha = check_strength(edit_strength)
    _check_widths(resid, sae, features)
    if is_noop(features, alpha) or resid.numel() == 0:
        return resid
    z = encode_with(sae, resid, features.latent_code)
    removed, added = spare_edit_latents(z, features, direction, alpha)
    # One decode call for both codes: SAELens keeps the input-normalisation state of the last
    # `encode` for exactly one `decode`, and it broadcasts over the new leading dimension.
    decoded = sae.decode(torch.stack([z - removed + added, z]))
    delta = (decoded[0] - decoded[1]).to(resid.dtype)
    changed = (removed != 0).any(-1) | (added != 0).any(-1)
    if stats is not None:
        stats.update(removed, added, changed)
    return torch.where(changed[..., None], resid + delta, resid)


def sae_label(sae: SAE) -> str:
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    return (
        f"SAE {type(sae).__name__}(hook_name={hook!r}, d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae})"
    )
