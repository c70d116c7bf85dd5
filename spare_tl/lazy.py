"""Names that a module re-exports from other modules, imported on first use.

``spare_tl`` and ``spare_tl.viz`` stay light to import (``spare-tl --help`` loads no torch or
plotly). Each passes its name -> defining-module map here and gets ``__getattr__`` back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(module: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving each name of ``exports`` from its defining module."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
