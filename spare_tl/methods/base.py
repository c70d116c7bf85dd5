"""What a steering method is: the protocol the evaluation harness runs, and its plain base.

A :class:`SteeringMethod` builds its prompts and, where it edits the model, a context manager
that adds hooks (:meth:`SteeringMethod.steering`). Methods that change only the last prompt
position and decode greedily set ``shares_prefix`` so that the harness
(:mod:`spare_tl.stages.harness`) can run the prompt prefix once for every condition; a method
that changes earlier positions or decodes differently overrides :meth:`SteeringMethod.answer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Protocol, runtime_checkable

from spare_tl.data.prompts import conflict_prompt
from spare_tl.data.schema import ConflictItem
from spare_tl.generation import greedy_generate
from spare_tl.methods.hooks import Direction, check_direction

__all__ = ["NoSteering", "PromptMethod", "SteeringMethod", "check_direction"]


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
