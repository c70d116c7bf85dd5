"""SpARE's edit and the TransformerLens hooks that apply it (``docs/method.md``, "The edit").

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
runs a linear conflict probe (:class:`spare_tl.probes.ConflictProbe`) at its layer on the
last prompt position during the prompt pass, and the edit is applied only to the rows it
flags; the other rows run exactly as without steering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from spare_tl.errors import SAEMismatchError
from spare_tl.features import FunctionalFeatures, LayerFeatures, sae_fingerprint
from spare_tl.saes import encode_with, site_of_hook

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens.hook_points import HookPoint

    from spare_tl.probes import ConflictProbe

logger = logging.getLogger(__name__)

Direction = Literal["context", "memory"]
DIRECTIONS: tuple[str, ...] = ("context", "memory")
When = Literal["always", "conflict"]
WHEN: tuple[str, ...] = ("always", "conflict")

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
    "Steering",
    "attach_hooks",
    "edit_hook_name",
    "resid_post_hook_name",
    "spare_edit",
    "spare_edit_latents",
    "steer",
    "When",
]


def resid_post_hook_name(layer: int) -> str:
    """The TransformerLens hook SpARE edits at ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def _check_direction(direction: object) -> Direction:
    if direction not in DIRECTIONS:
        raise ValueError(
            f"direction must be 'context' or 'memory' (steer towards the context or towards "
            f"parametric memory), got {direction!r}"
        )
    return direction  # type: ignore[return-value]


def _check_strength(edit_strength: float) -> float:
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


def _is_noop(features: LayerFeatures, edit_strength: float) -> bool:
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
    direction = _check_direction(direction)
    alpha = _check_strength(edit_strength)
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
            f"({_sae_label(sae)}); use an SAE trained on this model's residual stream"
        )
    if features.d_sae != d_sae:
        raise ValueError(
            f"layer {features.layer}: functional features have d_sae {features.d_sae} but "
            f"{_sae_label(sae)} has d_sae {d_sae}; use the SAE the features were found with"
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
    direction = _check_direction(direction)
    alpha = _check_strength(edit_strength)
    _check_widths(resid, sae, features)
    if _is_noop(features, alpha) or resid.numel() == 0:
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


def _sae_label(sae: SAE) -> str:
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    return (
        f"SAE {type(sae).__name__}(hook_name={hook!r}, d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae})"
    )


@dataclass
class _PromptState:
    batch: int
    prompt_len: int
    seq_len: int
    anchor: Tensor  # unedited residual at the last prompt position, [batch, d_model]
    cached: bool = False  # a 1-token (KV-cache) step followed the prompt pass
    uncached: bool = False  # a full re-run (no KV cache) followed the prompt pass


def _same_rows(x: Tensor, anchor: Tensor) -> bool:
    """Whether x re-computes anchor (same prompt re-run), allowing float noise."""
    tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 3e-2
    diff = (x.float() - anchor.float()).norm(dim=-1)
    scale = anchor.float().norm(dim=-1) + 1e-6
    return bool((diff <= tol * scale).all())


@dataclass
class LastPromptPosition:
    """Which position of each forward at a residual hook is the last prompt position.

    Called with the hook's ``[batch, pos, d_model]`` input, it returns one position per row
    to edit, or None to leave the forward untouched:

    - Prompt pass (a new prompt, seq len > 1 or the first call): position prompt_len − 1
      (in a left-padded batch the last position of every row).
    - KV-cache steps (seq len 1 after a prompt pass, same batch): None; the cache carries
      the edit.
    - Without the KV cache each step re-runs the growing sequence: a forward whose seq len is
      the previous + 1, with the same batch size and the same (unedited) residual at the
      original last prompt position, is a continuation and is edited at that original
      position again. Anything else is a new prompt.
    - ``positions`` (one index per row) overrides this for right-padded ``model(...)`` calls:
      every forward with more than one position edits those positions.

    Call :meth:`reset` to forget the current prompt.
    """

    positions: Int[Tensor, " batch"] | None = None
    _state: _PromptState | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.positions is not None:
            self.positions = torch.as_tensor(self.positions, dtype=torch.long).reshape(-1)

    def reset(self) -> None:
        """Forget the remembered prompt; the next forward is treated as a new prompt."""
        self._state = None

    def __call__(self, resid: Float[Tensor, "batch pos d_model"]) -> Int[Tensor, " batch"] | None:
        batch, seq = resid.shape[0], resid.shape[1]
        if self.positions is not None:
            if seq == 1 and int(self.positions.max()) > 0:
                return None  # a KV-cache step after the prompt pass
            if self.positions.numel() != batch:
                raise ValueError(
                    f"positions has {self.positions.numel()} entries but the batch has {batch} rows"
                )
            if int(self.positions.min()) < 0 or int(self.positions.max()) >= seq:
                raise ValueError(f"positions must lie in [0, {seq}) for this {seq}-token input")
            return self.positions.to(resid.device)

        rows = torch.arange(batch, device=resid.device)
        st = self._state
        if st is not None and st.batch == batch:
            if seq == 1 and not st.uncached:
                st.cached = True
                st.seq_len += 1
                return None
            if (
                not st.cached
                and seq == st.seq_len + 1
                and _same_rows(resid[rows, st.prompt_len - 1], st.anchor)
            ):
                st.uncached = True
                st.seq_len = seq
                return torch.full((batch,), st.prompt_len - 1, device=resid.device)
        self._state = _PromptState(
            batch=batch, prompt_len=seq, seq_len=seq, anchor=resid[:, -1].detach().clone()
        )
        return torch.full((batch,), seq - 1, device=resid.device)


def _edit_rows(
    resid: Float[Tensor, "batch pos d_model"],
    positions: Int[Tensor, " batch"],
    edit: Callable[[Tensor], Tensor],
) -> Float[Tensor, "batch pos d_model"]:
    rows = torch.arange(resid.shape[0], device=resid.device)
    out = resid.clone()
    out[rows, positions] = edit(resid[rows, positions]).to(resid.dtype)
    return out


@dataclass
class LastPromptPositionHook:
    """Forward hook that applies a pure edit ``f(resid_last) -> resid_last`` at the last
    prompt position of every row, once, before decoding (positions as in
    :class:`LastPromptPosition`). The edit sees and returns ``[batch, d_model]``.

    The building block of hook-style steering (ActAdd, task vectors); SpARE's own
    :class:`LastPromptPositionEdit` uses the same position logic.
    """

    edit: Callable[[Float[Tensor, "batch d_model"]], Float[Tensor, "batch d_model"]]
    positions: Int[Tensor, " batch"] | None = None
    calls: int = field(default=0, init=False)
    _where: LastPromptPosition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._where = LastPromptPosition(self.positions)

    def reset(self) -> None:
        """Forget the remembered prompt; the next forward is treated as a new prompt."""
        self._where.reset()

    def __call__(
        self, resid: Float[Tensor, "batch pos d_model"], hook: HookPoint | None = None
    ) -> Float[Tensor, "batch pos d_model"] | None:
        positions = self._where(resid)
        if positions is None:
            return None
        self.calls += 1
        return _edit_rows(resid, positions, self.edit)


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
        self.direction = _check_direction(self.direction)
        self.edit_strength = _check_strength(self.edit_strength)
        if self.features.d_sae != int(self.sae.cfg.d_sae):
            raise ValueError(
                f"layer {self.features.layer}: functional features have d_sae "
                f"{self.features.d_sae} but {_sae_label(self.sae)} has d_sae {self.sae.cfg.d_sae}"
            )
        self._where = LastPromptPosition(self.positions)
        self.positions = self._where.positions

    def reset(self) -> None:
        """Forget the remembered prompt; the next forward is treated as a new prompt."""
        self._where.reset()

    @property
    def is_noop(self) -> bool:
        return _is_noop(self.features, self.edit_strength)

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
            return _edit_rows(resid, positions, edit)
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
            f"layer {layer}: {_sae_label(sae)} was trained on hook {sae_hook!r}, but SpARE "
            f"edits {hook_name!r}; pass the SAE for that hook"
        )
    if layer_features.hook_name and layer_features.hook_name != hook_name:
        raise ValueError(
            f"layer {layer}: the functional features were found at {layer_features.hook_name!r}, "
            f"not {hook_name!r}"
        )
    if int(sae.cfg.d_in) != int(model.cfg.d_model):
        raise ValueError(
            f"layer {layer}: {_sae_label(sae)} has d_in {sae.cfg.d_in} but the model's d_model "
            f"is {model.cfg.d_model}; use an SAE trained on this model"
        )
    if layer_features.d_sae != int(sae.cfg.d_sae):
        raise ValueError(
            f"layer {layer}: functional features have d_sae {layer_features.d_sae} but "
            f"{_sae_label(sae)} has d_sae {sae.cfg.d_sae}; use the SAE the features were found with"
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
            f"layer {layer}: {_sae_label(sae)} is not the SAE the functional features were "
            f"found with{where}: its fingerprint (weights + cfg) is {got}, the feature set "
            f"records {expected}; pass the SAEs the features were made with, or rebuild the "
            "features for these SAEs (`spare-tl features CONFIG`)"
        )


def _validate_probe(
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


def _remove_handle(hook_point: HookPoint, handle: Any) -> None:
    handle.hook.remove()
    hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not handle]


@contextlib.contextmanager
def attach_hooks(
    model: HookedTransformer, hooks: Iterable[tuple[str, Callable[..., Any]]]
) -> Iterator[None]:
    """Add forward hooks ``(hook_name, fn)`` inside the ``with`` block and remove exactly
    those on exit, also after an exception; hooks the user added stay."""
    added: list[tuple[HookPoint, Any]] = []
    try:
        for name, hook_fn in hooks:
            if name not in model.hook_dict:
                raise ValueError(f"the model has no hook point {name!r}")
            hook_point = model.hook_dict[name]
            before = {id(h) for h in hook_point.fwd_hooks}
            hook_point.add_hook(hook_fn, dir="fwd")
            added.extend((hook_point, h) for h in hook_point.fwd_hooks if id(h) not in before)
        yield
    finally:
        for hook_point, handle in added:
            _remove_handle(hook_point, handle)


@contextlib.contextmanager
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

    ``when="conflict"`` (with a :class:`~spare_tl.probes.ConflictProbe`) steers only the rows
    the probe flags: it reads ``blocks.{probe.layer}.hook_resid_post`` at the last prompt
    position during the prompt pass (its layer must be <= the first edited layer) and the
    other rows run exactly as without steering.
    """
    if when not in WHEN:
        raise ValueError(f"when must be 'always' or 'conflict', got {when!r}")
    if when == "conflict" and probe is None:
        raise ValueError(
            "when='conflict' needs probe=ConflictProbe(...) (spare_tl.probes): the probe "
            "decides which rows are steered"
        )
    if when == "always" and probe is not None:
        raise ValueError("a probe is only used with when='conflict'; pass when='conflict'")
    if direction is None or direction == "none":
        yield Steering(direction=None, edit_strength=0.0)
        return
    direction = _check_direction(direction)
    features = features.for_direction(direction)
    alpha = _check_strength(
        features.strength(direction) if edit_strength is None else edit_strength
    )
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
        _validate_probe(model, probe, {layer: site_of_hook(h) for layer, h in hooks.items()})
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
