"""Where a steering method acts: the last prompt position of each row, and hooks that never leak.

:class:`LastPromptPosition` tells, for each forward at a hook, which position of every row is
the last prompt position (prompt pass, KV-cache steps, re-runs without the cache, explicit
positions for right padding); :class:`LastPromptPositionHook` applies a pure edit there;
:func:`attach_hooks` adds hooks for a ``with`` block and removes exactly those on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spare_tl.saes import site_hook_name

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.hook_points import HookPoint

Direction = Literal["context", "memory"]
DIRECTIONS: tuple[str, ...] = ("context", "memory")
When = Literal["always", "conflict"]
WHEN: tuple[str, ...] = ("always", "conflict")

__all__ = [
    "DIRECTIONS",
    "WHEN",
    "Direction",
    "LastPromptPosition",
    "LastPromptPositionHook",
    "When",
    "attach_hooks",
    "check_direction",
    "edit_rows",
    "resid_post_hook_name",
]


def resid_post_hook_name(layer: int) -> str:
    """The TransformerLens hook SpARE edits at ``layer``."""
    return site_hook_name(layer, "resid_post")


def check_direction(direction: object) -> Direction:
    if direction not in DIRECTIONS:
        raise ValueError(
            f"direction must be 'context' or 'memory' (steer towards the context or towards "
            f"parametric memory), got {direction!r}"
        )
    return direction  # type: ignore[return-value]


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


def edit_rows(
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
        return edit_rows(resid, positions, self.edit)


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
