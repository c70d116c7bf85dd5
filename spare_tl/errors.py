"""Every error class spare-tl raises for faults it anticipates; each message names the file
and the fix.

The CLI prints any of them (and the :class:`ValueError` / :class:`OSError` family they build
on) as one line, exit code 2; ``spare-tl --debug`` shows the traceback.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

#: how many problems a :class:`DatasetError` message lists (all are in ``problems``)
MAX_PROBLEMS_IN_MESSAGE = 50


class CacheError(ValueError):
    """A cached stage or file cannot be trusted: damaged, incomplete or unsealed."""


class SAEMismatchError(ValueError):
    """The SAE given for a layer is not the one a feature set was found with."""


class ArgumentError(ValueError):
    """A command-line argument or output path that would fail later; checked before work."""


class SAEError(ValueError):
    """An SAE does not fit the model or hook it is used with; the message says why."""


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what to do."""


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context window."""


class DatasetError(ValueError):
    """A conflict dataset that cannot be used as it is; ``problems`` lists every issue found
    (:class:`spare_tl.data.schema.ValidationIssue`)."""

    def __init__(self, source: str, problems: Sequence[Any]) -> None:
        self.source = source
        self.problems = list(problems)
        shown = [f"  {p}" for p in self.problems[:MAX_PROBLEMS_IN_MESSAGE]]
        more = len(self.problems) - len(shown)
        if more > 0:
            shown.append(f"  ... and {more} more")
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n" + "\n".join(shown))


class DatasetUnavailableError(FileNotFoundError):
    """A hub dataset that is neither in the local Hugging Face cache nor reachable."""


class MalformedCacheError(ValueError):
    """A file of the paper's original cache does not hold what the layout promises."""


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something outside the allow-list (refused, nothing was run)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), for one-line
    notes such as the report's list of missing parts."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
