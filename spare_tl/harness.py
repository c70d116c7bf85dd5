"""The one evaluation harness: steering methods answer conflict items under named conditions.

Everything that asks the model conflict questions under steering goes through
:func:`answer_conditions`: the held-out evaluation (:func:`spare_tl.evaluation.evaluate`,
for SpARE and every baseline), the development sweep (:mod:`spare_tl.sweep`), conditional
steering (:mod:`spare_tl.probes`) and the steerability scan (:mod:`spare_tl.scan`).

A :class:`SteeringMethod` builds its prompts and, where it edits the model, a context manager
that adds hooks. Methods that change **only the last prompt position** and decode greedily
(``shares_prefix``: no steering, SpARE, ActAdd, task vectors, a donor patch) share one
prompt pass per batch (:func:`spare_tl.generation.generate_shared_prefix`); methods that
change earlier positions or decode differently (CAD's second context-free pass) keep their
own :meth:`SteeringMethod.answer`. Conditions with the same prompts share the prefix; a
method with other prompts (ICL's demonstrations) gets its own shared pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from spare_tl.data.prompts import conflict_prompt
from spare_tl.data.schema import ConflictItem
from spare_tl.generation import generate_shared_prefix, greedy_generate
from spare_tl.steering import DIRECTIONS, Direction, GateStats, Steering, steer

__all__ = [
    "Condition",
    "NoSteering",
    "PromptMethod",
    "SpareMethod",
    "SteeringMethod",
    "answer_conditions",
    "answer_prompts",
    "check_direction",
]


def check_direction(direction: object) -> Direction:
    """``direction`` if it is ``"context"`` or ``"memory"``, else a clear error."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'context' or 'memory', got {direction!r}")
    return direction  # type: ignore[return-value]


@runtime_checkable
class SteeringMethod(Protocol):
    """A way to answer conflict items, steered to context or memory (None: unsteered)."""

    name: str
    extra_forward_passes_per_token: float
    inference_time: bool
    shares_prefix: bool

    def hyperparameters(self, direction: Direction) -> dict[str, Any]: ...

    def prompts(
        self,
        items: Sequence[ConflictItem],
        demonstrations: Sequence[Sequence[ConflictItem]],
        direction: Direction | None,
        demo_type: str,
    ) -> list[str]: ...

    def steering(self, model, direction: Direction) -> AbstractContextManager[Any]: ...

    def answer(
        self,
        model,
        items: Sequence[ConflictItem],
        demonstrations: Sequence[Sequence[ConflictItem]],
        direction: Direction | None,
        *,
        demo_type: str = "doo",
        max_new_tokens: int = 12,
        batch_size: int = 16,
        progress: bool = False,
        desc: str = "generating",
    ) -> list[str]: ...


class PromptMethod:
    """Base of the methods: the evaluation's prompts, greedy decoding inside ``steering``.

    Subclasses change the prompts (:meth:`prompts`), add last-position hooks
    (:meth:`steering`) or decode differently (:meth:`answer`, then ``shares_prefix =
    False``). With ``direction=None`` every method answers unsteered.
    """

    name: ClassVar[str] = "none"
    extra_forward_passes_per_token: ClassVar[float] = 0.0
    inference_time: ClassVar[bool] = True
    shares_prefix: ClassVar[bool] = True

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        return {}

    def prompts(
        self,
        items: Sequence[ConflictItem],
        demonstrations: Sequence[Sequence[ConflictItem]],
        direction: Direction | None,
        demo_type: str,
    ) -> list[str]:
        return [conflict_prompt(it, d, demo_type) for it, d in zip(items, demonstrations)]

    def steering(self, model, direction: Direction) -> AbstractContextManager[Any]:
        return nullcontext()

    def answer(
        self,
        model,
        items: Sequence[ConflictItem],
        demonstrations: Sequence[Sequence[ConflictItem]],
        direction: Direction | None,
        *,
        demo_type: str = "doo",
        max_new_tokens: int = 12,
        batch_size: int = 16,
        progress: bool = False,
        desc: str = "generating",
    ) -> list[str]:
        """Answer without prefix sharing (the reference path: one full prompt pass)."""
        if len(items) != len(demonstrations):
            raise ValueError("give one list of demonstrations per item")
        if direction is None:
            prompts = PromptMethod.prompts(self, items, demonstrations, None, demo_type)
            context: AbstractContextManager[Any] = nullcontext()
        else:
            direction = check_direction(direction)
            prompts = self.prompts(items, demonstrations, direction, demo_type)
            context = self.steering(model, direction)
        with context:
            return greedy_generate(
                model,
                prompts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                desc=desc,
            )


class NoSteering(PromptMethod):
    """Answer the evaluation's prompts as they are."""

    name = "none"


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
        alpha = self.edit_strength
        return {
            "layers": self.features.edit_layers(direction),
            "proportion": self.features.for_direction(direction).proportion,
            "edit_strength": self.features.strength(direction) if alpha is None else alpha,
            "latent_code": self.features.latent_code,
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


@dataclass(frozen=True)
class Condition:
    """A named way to answer: ``method`` steered to ``direction`` (None: unsteered)."""

    name: str
    method: SteeringMethod
    direction: Direction | None = None


def _start(
    model, condition: Condition
) -> Callable[[list[int]], AbstractContextManager[Any]] | None:
    """The condition's steering for one batch of rows (None: unsteered). Methods with a
    ``row_steering(model, direction, rows)`` get the batch's row indices (per-item edits such
    as a donor patch); the others' ``steering(model, direction)`` is the same for every row."""
    if condition.direction is None:
        return None
    method, direction = condition.method, check_direction(condition.direction)
    per_row = getattr(method, "row_steering", None)
    if per_row is not None:
        return lambda rows: per_row(model, direction, rows)
    return lambda rows: method.steering(model, direction)


def answer_prompts(
    model,
    prompts: Sequence[str],
    conditions: Sequence[Condition],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "answering",
    shared_prefix: bool = True,
    seconds: dict[str, float] | None = None,
) -> dict[str, list[str]]:
    """Every condition's greedy answers to the same ready-made ``prompts``.

    For prompt sets that are not built from one item each (conditional steering's mixed
    conflict / no-conflict rows, the steerability scan's donors); every method must edit only
    the last prompt position (``shares_prefix``). With ``shared_prefix`` the prompts are run
    once per batch; without, each condition runs its own full prompt pass (the reference).
    """
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique, got {names}")
    own = [c.name for c in conditions if not c.method.shares_prefix]
    if own:
        raise ValueError(
            f"conditions {own} decode on their own; answer them with answer_conditions"
        )
    timer = seconds if seconds is not None else {}
    if shared_prefix:
        return generate_shared_prefix(
            model,
            prompts,
            {c.name: _start(model, c) for c in conditions},
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
            seconds=timer,
        )
    per_row = [c.name for c in conditions if hasattr(c.method, "row_steering")]
    if per_row:
        raise ValueError(f"conditions {per_row} edit per row and need the shared prefix")
    answers: dict[str, list[str]] = {}
    for cond in conditions:
        start_steering = _start(model, cond)
        start = time.perf_counter()
        with start_steering([]) if start_steering is not None else nullcontext():
            answers[cond.name] = greedy_generate(
                model,
                prompts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                desc=f"{desc}: {cond.name}",
            )
        timer[cond.name] = timer.get(cond.name, 0.0) + time.perf_counter() - start
    return answers


def answer_conditions(
    model,
    items: Sequence[ConflictItem],
    demonstrations: Sequence[Sequence[ConflictItem]],
    conditions: Sequence[Condition],
    *,
    demo_type: str = "doo",
    max_new_tokens: int = 12,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "answering",
    shared_prefix: bool = True,
    seconds: dict[str, float] | None = None,
) -> dict[str, list[str]]:
    """Every condition's greedy answers to ``items`` (one list per condition name).

    Conditions whose methods share the prompt prefix and whose prompts are identical run
    from one prompt pass per batch; the others answer on their own. ``shared_prefix=False``
    answers every condition with its own full prompt pass (the reference path, for tests and
    benchmarks). ``seconds`` accumulates wall time per condition name plus ``"prefix"``.
    """
    if len(items) != len(demonstrations):
        raise ValueError("give one list of demonstrations per item")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique, got {names}")
    timer = seconds if seconds is not None else {}
    answers: dict[str, list[str]] = {}
    groups: dict[tuple[str, ...], list[Condition]] = {}
    for cond in conditions:
        if cond.method.shares_prefix:
            prompts = tuple(cond.method.prompts(items, demonstrations, cond.direction, demo_type))
            groups.setdefault(prompts, []).append(cond)
            continue
        start = time.perf_counter()
        answers[cond.name] = cond.method.answer(
            model,
            items,
            demonstrations,
            cond.direction,
            demo_type=demo_type,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc=f"{desc}: {cond.name}",
        )
        timer[cond.name] = timer.get(cond.name, 0.0) + time.perf_counter() - start
    for prompts, group in groups.items():
        answers.update(
            answer_prompts(
                model,
                list(prompts),
                group,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                desc=desc,
                shared_prefix=shared_prefix,
                seconds=timer,
            )
        )
    return {name: answers[name] for name in names}
