"""The one evaluation harness: steering methods answer conflict items under named conditions.

Everything that asks the model conflict questions under steering goes through
:func:`answer_conditions`: the held-out evaluation (:func:`spare_tl.stages.evaluation.evaluate`,
for SpARE and every baseline), the development sweep (:mod:`spare_tl.stages.sweep`), conditional
steering (:mod:`spare_tl.studies.probes`) and the steerability scan (:mod:`spare_tl.stages.scan`).

A :class:`SteeringMethod` builds its prompts and, where it edits the model, a context manager
that adds hooks. Methods that change **only the last prompt position** and decode greedily
(``shares_prefix``: no steering, SpARE, ActAdd, task vectors, a donor patch) share one
prompt pass per batch (:func:`spare_tl.generation.generate_shared_prefix`); methods that
change earlier positions or decode differently (CAD's second context-free pass) keep their
own :meth:`SteeringMethod.answer`. Conditions with the same prompts share the prefix; a
method with other prompts (ICL's demonstrations) gets its own shared pass, and the rows of
every prompt set decode in the same forwards (:func:`spare_tl.generation.generate_prompt_sets`).
Conditions that only decode their prompts greedily (``edits`` False: no steering, the
closed-book row, ICL, CAD at α = −1) and have the same prompts are answered once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Unpack

from spare_tl.data.prompts import Questions
from spare_tl.generation import Decoding, DecodingOptions, generate_prompt_sets, greedy_generate
from spare_tl.methods.base import NoSteering, PromptMethod, SteeringMethod, check_direction
from spare_tl.methods.spare import Direction, SpareMethod

__all__ = [
    "Condition",
    "NoSteering",
    "PromptMethod",
    "Questions",
    "SpareMethod",
    "SteeringMethod",
    "answer_conditions",
    "answer_prompts",
    "check_direction",
]


@dataclass(frozen=True)
class Condition:
    """A named way to answer: ``method`` steered to ``direction`` (None: unsteered)."""

    name: str
    method: SteeringMethod
    direction: Direction | None = None


def _edits(condition: Condition) -> bool:
    """Whether the condition does more than greedy decoding of its method's prompts (a method
    without ``edits`` is taken to edit whenever it steers)."""
    if condition.direction is None:
        return False
    edits = getattr(condition.method, "edits", None)
    return True if edits is None else bool(edits(condition.direction))


def _shares(condition: Condition) -> bool:
    """Whether the condition can answer from a shared prompt pass."""
    return condition.method.shares_prefix or not _edits(condition)


def _start(
    model, condition: Condition
) -> Callable[[list[int]], AbstractContextManager[Any]] | None:
    """The condition's steering for one batch of rows (None: unsteered). Methods with a
    ``row_steering(model, direction, rows)`` get the batch's row indices (per-item edits such
    as a donor patch); the others' ``steering(model, direction)`` is the same for every row."""
    if not _edits(condition):
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
    shared_prefix: bool = True,
    seconds: dict[str, float] | None = None,
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> dict[str, list[str]]:
    """Every condition's greedy answers to the same ready-made ``prompts``.

    For prompt sets that are not built from one item each (conditional steering's mixed
    conflict / no-conflict rows, the steerability scan's donors); every method must edit only
    the last prompt position (``shares_prefix``). With ``shared_prefix`` the prompts are run
    once per batch; without, each condition runs its own full prompt pass (the reference).
    Decoding: ``decoding`` and/or its fields as keywords (:class:`~spare_tl.generation.Decoding`).
    """
    dec = Decoding.of(decoding, options, desc="answering")
    _check_unique(conditions)
    own = [c.name for c in conditions if not _shares(c)]
    if own:
        raise ValueError(
            f"conditions {own} decode on their own; answer them with answer_conditions"
        )
    answers = _answer_sets(model, [(list(prompts), list(conditions))], shared_prefix, dec, seconds)
    return {c.name: answers[c.name] for c in conditions}


def _answer_sets(
    model,
    sets: Sequence[tuple[list[str], list[Condition]]],
    shared_prefix: bool,
    dec: Decoding,
    seconds: dict[str, float] | None,
    set_seconds: list[float] | None = None,
) -> dict[str, list[str]]:
    """Answer each prompt set's conditions (all of which share a prompt pass); with
    ``shared_prefix`` every set decodes in the same forwards. Unedited conditions of one set
    are one computation: the first is answered and the others copy it, timed as it was."""
    timer = seconds if seconds is not None else {}
    spent: dict[str, float] = {}
    runs, copies = [], []
    for prompts, conditions in sets:
        plain = [c for c in conditions if not _edits(c)]
        runs.append((prompts, [c for c in conditions if _edits(c) or c is plain[0]]))
        copies += [(c.name, plain[0].name) for c in plain[1:]]
    if shared_prefix:
        answers = generate_prompt_sets(
            model,
            [(prompts, {c.name: _start(model, c) for c in run}) for prompts, run in runs],
            seconds=spent,
            set_seconds=set_seconds,
            decoding=dec,
        )
    else:
        per_row = [c.name for _, run in runs for c in run if hasattr(c.method, "row_steering")]
        if per_row:
            raise ValueError(f"conditions {per_row} edit per row and need the shared prefix")
        answers = {}
        for prompts, run in runs:
            for cond in run:
                start_steering = _start(model, cond)
                start = time.perf_counter()
                with start_steering([]) if start_steering is not None else nullcontext():
                    answers[cond.name] = greedy_generate(
                        model, prompts, decoding=dec.labelled(f"{dec.desc}: {cond.name}")
                    )
                spent[cond.name] = time.perf_counter() - start
    for name, source in copies:
        answers[name] = list(answers[source])
        spent[name] = spent[source]  # what it would cost alone
    for name, value in spent.items():
        timer[name] = timer.get(name, 0.0) + value
    return answers


def answer_conditions(
    model,
    questions: Questions,
    conditions: Sequence[Condition],
    *,
    shared_prefix: bool = True,
    seconds: dict[str, float] | None = None,
    prefix_seconds: dict[str, float] | None = None,
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> dict[str, list[str]]:
    """Every condition's greedy answers to the ``questions`` (one list per condition name).

    Conditions that share the prompt prefix (``shares_prefix``, or no edit at all) and whose
    prompts are identical run from one prompt pass per batch, and unedited conditions of the
    same prompts are answered once; the others answer on their own. ``shared_prefix=False``
    answers every condition with its own full prompt pass (the reference path, for tests and
    benchmarks). ``seconds`` accumulates wall time per condition name plus ``"prefix"`` (every
    shared prompt pass); ``prefix_seconds`` accumulates, per condition, the shared prompt pass
    of its own prompts, which it would pay alone.
    """
    dec = Decoding.of(decoding, options, desc="answering")
    _check_unique(conditions)
    timer = seconds if seconds is not None else {}
    answers: dict[str, list[str]] = {}
    groups: dict[tuple[str, ...], list[Condition]] = {}
    for cond in conditions:
        if _shares(cond):
            prompts = tuple(cond.method.prompts(questions, cond.direction))
            groups.setdefault(prompts, []).append(cond)
            continue
        start = time.perf_counter()
        answers[cond.name] = cond.method.answer(
            model, questions, cond.direction, dec.labelled(f"{dec.desc}: {cond.name}")
        )
        timer[cond.name] = timer.get(cond.name, 0.0) + time.perf_counter() - start
    sets = [(list(prompts), group) for prompts, group in groups.items()]
    set_seconds = [0.0] * len(sets)
    answers |= _answer_sets(model, sets, shared_prefix, dec, timer, set_seconds)
    if prefix_seconds is not None:
        for (_, group), spent in zip(sets, set_seconds):
            for cond in group:
                prefix_seconds[cond.name] = prefix_seconds.get(cond.name, 0.0) + spent
    return {c.name: answers[c.name] for c in conditions}


def _check_unique(conditions: Sequence[Condition]) -> None:
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique, got {names}")
