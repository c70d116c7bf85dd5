"""What a steering method is: the protocol the evaluation harness runs, and its plain base.

A :class:`SteeringMethod` builds its prompts and, where it edits the model, a context manager
that adds hooks (:meth:`SteeringMethod.steering`). Methods that change only the last prompt
position and decode greedily set ``shares_prefix`` so that the harness
(:mod:`spare_tl.stages.harness`) can run the prompt prefix once for every condition; a method
that changes earlier positions or decodes differently overrides :meth:`PromptMethod.decode`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Protocol, runtime_checkable

from spare_tl.data.prompts import Questions
from spare_tl.generation import Decoding, greedy_generate
from spare_tl.methods.hooks import Direction, check_direction

__all__ = ["NoSteering", "PromptMethod", "Questions", "SteeringMethod", "check_direction"]


@runtime_checkable
class SteeringMethod(Protocol):
    """A way to answer conflict questions, steered to context or memory (None: unsteered)."""

    name: str
    extra_forward_passes_per_token: float
    inference_time: bool
    shares_prefix: bool

    def hyperparameters(self, direction: Direction) -> dict[str, Any]: ...

    def prompts(self, questions: Questions, direction: Direction | None) -> list[str]: ...

    def steering(self, model, direction: Direction) -> AbstractContextManager[Any]: ...

    def answer(
        self, model, questions: Questions, direction: Direction | None, decoding: Decoding | None
    ) -> list[str]: ...


class PromptMethod:
    """Base of the methods: the questions' prompts, greedy decoding inside ``steering``.

    Subclasses change the prompts (:meth:`prompts`), add last-position hooks
    (:meth:`steering`) or decode differently (:meth:`decode`, then ``shares_prefix =
    False``). With ``direction=None`` every method answers unsteered.
    """

    name: ClassVar[str] = "none"
    extra_forward_passes_per_token: ClassVar[float] = 0.0
    inference_time: ClassVar[bool] = True
    shares_prefix: ClassVar[bool] = True

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        return {}

    def prompts(self, questions: Questions, direction: Direction | None) -> list[str]:
        return questions.prompts()

    def edits(self, direction: Direction | None) -> bool:
        """Whether answering ``direction`` does more than greedy decoding of
        :meth:`prompts` (hooks, another decoding rule). Methods that only change the prompts
        say False, so the harness answers conditions that are the same computation once."""
        return direction is not None

    def steering(self, model, direction: Direction) -> AbstractContextManager[Any]:
        return nullcontext()

    def answer(
        self,
        model,
        questions: Questions,
        direction: Direction | None,
        decoding: Decoding | None = None,
    ) -> list[str]:
        """Answer without prefix sharing (the reference path: one full prompt pass); no
        progress bar unless ``decoding`` asks for one."""
        decoding = decoding or Decoding(progress=False)
        if direction is None:
            return greedy_generate(model, questions.prompts(), decoding=decoding)
        return self.decode(model, questions, check_direction(direction), decoding)

    def decode(
        self, model, questions: Questions, direction: Direction, decoding: Decoding
    ) -> list[str]:
        """Steered answers: greedy decoding of :meth:`prompts` inside :meth:`steering`."""
        prompts = self.prompts(questions, direction)
        with self.steering(model, direction):
            return greedy_generate(model, prompts, decoding=decoding)


class NoSteering(PromptMethod):
    """Answer the evaluation's prompts as they are."""

    name = "none"

    def edits(self, direction: Direction | None) -> bool:
        return False
