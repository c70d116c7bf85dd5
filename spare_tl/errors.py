"""The errors spare-tl raises for faults it anticipates; each message names the file and the fix.

The CLI prints any of them (and the :class:`ValueError` / :class:`OSError` family they build
on) as one line, exit code 2; ``spare-tl --debug`` shows the traceback.
"""

from __future__ import annotations


class CacheError(ValueError):
    """A cached stage or file cannot be trusted: damaged, incomplete or unsealed."""


class SAEMismatchError(ValueError):
    """The SAE given for a layer is not the one a feature set was found with."""


class ArgumentError(ValueError):
    """A command-line argument or output path that would fail later; checked before work."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), for one-line
    notes such as the report's list of missing parts."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
