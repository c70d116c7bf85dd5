"""SpARE's steering: the edit (:mod:`spare_tl.methods.edit`) applied by TransformerLens hooks.

The edit is a pure function of (residual activations, SAE, functional features, α):

- steer to **context**: remove memory features, r = min(α z̄_M, z) (at most what is active),
  and add context features, a = max(α z̄_C − z, 0) (only what is missing);
- steer to **memory**: the same with the roles of C and M swapped;
- h' = h + decode(z − r + a) − decode(z), so decoder biases cancel and the SAE's run-time
  input/output normalisation is respected.

z is the feature set's latent code (``LayerFeatures.latent_code``, the definition its
statistics were computed with): the SAE's own ``encode`` (post-top-k for TopK SAEs,
post-JumpReLU for JumpReLU SAEs) or, for TopK SAEs, the ReLU pre-activations before the top-k
cut (``"relu_pre"``, SpARE's released code).

:func:`steer` applies the edit at ``blocks.{l}.hook_resid_post`` of each edited layer, at the
last prompt position only, once before decoding: with the KV cache the edit is carried to
every generated token; without it, each re-run of the growing sequence re-applies the edit at
the original prompt position, so both give the same tokens.

``steer(..., when="conflict", probe=...)`` is conditional steering: a :class:`ConflictGate`
runs a linear conflict probe (:class:`spare_tl.methods.conflict_probe.ConflictProbe`) at its layer on the
last prompt position during the prompt pass, and the edit is applied only to the rows it
flags; the other rows run exactly as without steering.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spare_tl.errors import SAEMismatchError
from spare_tl.features import FunctionalFeatures, LayerFeatures, sae_fingerprint
from spare_tl.methods.base import PromptMethod
from spare_tl.methods.conflict_probe import ConflictGate, GateStats, validate_probe
from spare_tl.methods.edit import (
    EditStats,
    check_strength,
    is_noop,
    sae_label,
    spare_edit,
    spare_edit_latents,
)
from spare_tl.methods.hooks import (
    DIRECTIONS,
    WHEN,
    Direction,
    LastPromptPosition,
    LastPromptPositionHook,
    When,
    attach_hooks,
    check_direction,
    edit_rows,
    resid_post_hook_name,
)
from spare_tl.saes import site_of_hook

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens.hook_points import HookPoint

    from spare_tl.methods.conflict_probe import ConflictProbe

logger = logging.getLogger(__name__)

# the edit, the hooks and the gate live in their own modules; the names stay importable here
__all__ = [
    "DIRECTIONS",
    "WHEN",
    "ConflictGate",
    "Direction",
    "EditStats",
    "GateStats",
    "LastPromptPosition",
    "LastPromptPositionEdit",
    "LastPromptPositionHook",
    "SpareMethod",
    "Steering",
    "When",
    "attach_hooks",
    "edit_hook_name",
    "resid_post_hook_name",
    "spare_edit",
    "spare_edit_latents",
    "steer",
]


@dataclass
class LastPromptPositionEdit:
    """Forward hook for ``blocks.{layer}.hook_resid_post`` that SpARE-edits the last prompt
    position of every row, once, before decoding.

    Which position is edited in which forward (prompt pass, KV-cache steps, re-runs without
    the cache, explicit ``positions`` for right padding) is :class:`LastPromptPosition`'s
    job. Call :meth:`reset` to forget the current prompt.
    """

    sae: SAE
    features: LayerFeatures
    direction: Direction
    edit_strength: float
    positions: Int[Tensor, " batch"] | None = None
    stats: EditStats = field(default_factory=EditStats)
    gate: ConflictGate | None = None  # edit only the rows it flags (conditional steering)
    _where: LastPromptPosition = field(init=False, repr=False)
    _prepared: dict[Any, LayerFeatures] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.direction = check_direction(self.direction)
        self.edit_strength = check_strength(self.edit_strength)
        if self.features.d_sae != int(self.sae.cfg.d_sae):
            raise ValueError(
                f"layer {self.features.layer}: functional features have d_sae "
                f"{self.features.d_sae} but {sae_label(self.sae)} has d_sae {self.sae.cfg.d_sae}"
            )
        self._where = LastPromptPosition(self.positions)
        self.positions = self._where.positions

    def reset(self) -> None:
        """Forget the remembered prompt; the next forward is treated as a new prompt."""
        self._where.reset()

    @property
    def is_noop(self) -> bool:
        return is_noop(self.features, self.edit_strength)

    def _features_on(self, device: torch.device) -> LayerFeatures:
        if device not in self._prepared:
            f = self.features
            # every field kept (the latent code above all), tensors on the device
            self._prepared[device] = dataclasses.replace(
                f,
                context_features=f.context_features.to(device),
                memory_features=f.memory_features.to(device),
                context_activations=f.context_activations.to(device),
                memory_activations=f.memory_activations.to(device),
            )
        return self._prepared[device]

    def _positions_to_edit(self, resid: Tensor) -> Tensor | None:
        """Per-row position to edit in this forward, or None to leave it untouched."""
        return self._where(resid)

    def __call__(
        self, resid: Float[Tensor, "batch pos d_model"], hook: HookPoint | None = None
    ) -> Float[Tensor, "batch pos d_model"] | None:
        if self.is_noop:
            return None
        positions = self._positions_to_edit(resid)
        if positions is None:
            return None
        flagged: Tensor | None = None
        if self.gate is not None:
            flagged = self.gate.row_mask(resid.shape[0], resid.device)
            if not bool(flagged.any()):
                return None
            if bool(flagged.all()):
                flagged = None
        if self.sae.device != resid.device:
            self.sae.to(resid.device)
        features = self._features_on(resid.device)

        def edit(h: Tensor) -> Tensor:
            return spare_edit(
                h, self.sae, features, self.direction, self.edit_strength, stats=self.stats
            )

        if flagged is None:
            return edit_rows(resid, positions, edit)
        rows = torch.nonzero(flagged).squeeze(1)
        out = resid.clone()
        out[rows, positions[rows]] = edit(resid[rows, positions[rows]]).to(resid.dtype)
        return out


@dataclass
class Steering:
    """What :func:`steer` yields: the active hooks by layer (empty when steering is off)."""

    direction: Direction | None
    edit_strength: float
    hooks: dict[int, LastPromptPositionEdit] = field(default_factory=dict)
    gate: ConflictGate | None = None  # the conflict probe's hook when when="conflict"

    def reset(self) -> None:
        """Forget remembered prompts in every hook (e.g. before an unrelated forward)."""
        for h in self.hooks.values():
            h.reset()
        if self.gate is not None:
            self.gate.reset()

    @property
    def stats(self) -> dict[int, EditStats]:
        return {layer: h.stats for layer, h in self.hooks.items()}


def edit_hook_name(layer: int, layer_features: LayerFeatures) -> str:
    """The hook SpARE edits for ``layer``: where its features were found (the residual
    ``blocks.{l}.hook_resid_post`` unless the set records another site, e.g. ``hook_attn_out``)."""
    name = layer_features.hook_name or resid_post_hook_name(layer)
    site_of_hook(name)  # a clear error for a hook SpARE does not edit
    if int(name.split(".")[1]) != int(layer):
        raise ValueError(f"layer {layer}: the functional features record hook {name!r}")
    return name


def _sae_for_layer(saes: Mapping[Any, SAE], layer: int, hook_name: str | None = None) -> SAE:
    hook_name = hook_name or resid_post_hook_name(layer)
    for key in (hook_name, layer, str(layer)):
        if key in saes:
            return saes[key]
    raise ValueError(
        f"no SAE for layer {layer}: pass saes={{{layer}: sae}} or {{{hook_name!r}: sae}} "
        f"(got keys {sorted(map(str, saes))})"
    )


def _validate_layer(
    model: HookedTransformer, layer: int, sae: SAE, layer_features: LayerFeatures
) -> None:
    hook_name = edit_hook_name(layer, layer_features)
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the model's {n_layers} layers [0, {n_layers})")
    sae_hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if sae_hook != hook_name:
        raise ValueError(
            f"layer {layer}: {sae_label(sae)} was trained on hook {sae_hook!r}, but SpARE "
            f"edits {hook_name!r}; pass the SAE for that hook"
        )
    if layer_features.hook_name and layer_features.hook_name != hook_name:
        raise ValueError(
            f"layer {layer}: the functional features were found at {layer_features.hook_name!r}, "
            f"not {hook_name!r}"
        )
    if int(sae.cfg.d_in) != int(model.cfg.d_model):
        raise ValueError(
            f"layer {layer}: {sae_label(sae)} has d_in {sae.cfg.d_in} but the model's d_model "
            f"is {model.cfg.d_model}; use an SAE trained on this model"
        )
    if layer_features.d_sae != int(sae.cfg.d_sae):
        raise ValueError(
            f"layer {layer}: functional features have d_sae {layer_features.d_sae} but "
            f"{sae_label(sae)} has d_sae {sae.cfg.d_sae}; use the SAE the features were found with"
        )
    if hook_name not in model.hook_dict:
        raise ValueError(
            f"the model has no hook point {hook_name!r} (is an SAE spliced in there with "
            "add_sae? remove it before steering)"
        )
    _check_same_sae(layer, sae, layer_features)


def _check_same_sae(layer: int, sae: SAE, layer_features: LayerFeatures) -> None:
    """Refuse an SAE other than the one the features were found with (same width is not
    enough: permuted or retrained latents would be edited by the wrong ids)."""
    expected = layer_features.sae_fingerprint
    if not expected:
        return  # a set made before fingerprints: nothing to compare
    got = sae_fingerprint(sae)
    if got != expected:
        where = f" ({layer_features.sae_id})" if layer_features.sae_id else ""
        raise SAEMismatchError(
            f"layer {layer}: {sae_label(sae)} is not the SAE the functional features were "
            f"found with{where}: its fingerprint (weights + cfg) is {got}, the feature set "
            f"records {expected}; pass the SAEs the features were made with, or rebuild the "
            "features for these SAEs (`spare-tl features CONFIG`)"
        )


@contextmanager
def steer(
    model: HookedTransformer,
    features: FunctionalFeatures,
    direction: Direction | Literal["none"] | None,
    saes: Mapping[int, SAE] | Mapping[str, SAE],
    edit_strength: float | None = None,
    layers: Sequence[int] | None = None,
    *,
    positions: Int[Tensor, " batch"] | None = None,
    when: When = "always",
    probe: ConflictProbe | None = None,
) -> Iterator[Steering]:
    """Steer ``model`` towards ``direction`` with SpARE inside the ``with`` block.

    Adds one forward hook per edited layer at the features' hook (``blocks.{l}.hook_resid_post``,
    or the attention / MLP output for a set found there; layers: all of
    ``features.for_direction(direction).layers`` unless ``layers`` is given) and removes
    exactly those hooks on exit, also after an exception; hooks the user added stay. Works around ``model.generate(...)``
    (left-padded batches, KV cache on or off) and ``model(...)``; pass ``positions`` for
    right-padded ``model(...)`` calls. ``edit_strength`` defaults to
    ``features.strength(direction)``. ``direction`` None or ``"none"`` steers nothing.

    ``when="conflict"`` (with a :class:`~spare_tl.methods.conflict_probe.ConflictProbe`) steers only the rows
    the probe flags: it reads ``blocks.{probe.layer}.hook_resid_post`` at the last prompt
    position during the prompt pass (its layer must be <= the first edited layer) and the
    other rows run exactly as without steering.
    """
    if when not in WHEN:
        raise ValueError(f"when must be 'always' or 'conflict', got {when!r}")
    if when == "conflict" and probe is None:
        raise ValueError(
            "when='conflict' needs probe=ConflictProbe(...) (spare_tl.methods.conflict_probe): the probe "
            "decides which rows are steered"
        )
    if when == "always" and probe is not None:
        raise ValueError("a probe is only used with when='conflict'; pass when='conflict'")
    if direction is None or direction == "none":
        yield Steering(direction=None, edit_strength=0.0)
        return
    direction = check_direction(direction)
    features = features.for_direction(direction)
    alpha = check_strength(features.strength(direction) if edit_strength is None else edit_strength)
    chosen = sorted(features.layers) if layers is None else [int(layer) for layer in layers]
    steering = Steering(direction=direction, edit_strength=alpha)
    for layer in chosen:
        if layer not in features.layers:
            raise ValueError(
                f"layer {layer} has no functional features (feature layers: "
                f"{sorted(features.layers)})"
            )
    hooks = {layer: edit_hook_name(layer, features.layers[layer]) for layer in chosen}
    if when == "conflict":
        assert probe is not None
        validate_probe(model, probe, {layer: site_of_hook(h) for layer, h in hooks.items()})
        steering.gate = ConflictGate(probe, positions=positions)
    for layer in chosen:
        sae = _sae_for_layer(saes, layer, hooks[layer])
        _validate_layer(model, layer, sae, features.layers[layer])
        steering.hooks[layer] = LastPromptPositionEdit(
            sae=sae,
            features=features.layers[layer],
            direction=direction,
            edit_strength=alpha,
            positions=positions,
            gate=steering.gate,
        )

    named: list[tuple[str, Callable[..., Any]]] = []
    if steering.gate is not None:  # first: it reads the residual before an edit there
        named.append((resid_post_hook_name(int(steering.gate.probe.layer)), steering.gate))
    named += [(hooks[layer], fn) for layer, fn in steering.hooks.items()]
    with attach_hooks(model, named):
        logger.debug("steering to %s with α=%s at layers %s", direction, alpha, chosen)
        yield steering


@dataclass
class SpareMethod(PromptMethod):
    """SpARE's edit with a feature set (``edit_strength`` None: the features' α).

    ``when="conflict"`` with a conflict ``probe`` steers only the rows the probe flags."""

    features: Any
    saes: Mapping[Any, Any]
    edit_strength: float | None = None
    when: Literal["always", "conflict"] = "always"
    probe: Any = None
    name: ClassVar[str] = "spare"

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        setting = self.features.setting(direction)
        alpha = self.edit_strength
        return {
            "layers": list(setting.layers),
            "proportion": setting.proportion,
            "edit_strength": setting.edit_strength if alpha is None else alpha,
            "latent_code": setting.latent_code,
        }

    gate_stats: GateStats | None = None  # accumulates the conflict gate's decisions

    @contextmanager
    def steering(self, model, direction: Direction) -> Iterator[Steering]:
        with steer(
            model,
            self.features,
            direction,
            self.saes,
            self.edit_strength,
            when=self.when,
            probe=self.probe,
        ) as steering:
            yield steering
            if steering.gate is not None and self.gate_stats is not None:
                for key in ("prompts", "rows", "flagged"):
                    total = getattr(self.gate_stats, key) + getattr(steering.gate.stats, key)
                    setattr(self.gate_stats, key, total)
