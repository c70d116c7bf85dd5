"""The built-in offline knowledge-conflict set (NQ-Swap schema), shipped with the package.

Built from curated fact tables by :mod:`spare_tl.data.build_builtin`; see
``spare_tl/data/builtin/README.md`` for what it holds and where each relation's facts come from.
"""

from __future__ import annotations

import json
from importlib import resources

from spare_tl.data.schema import ConflictItem

BUILTIN_VERSIONS: tuple[str, ...] = ("v1",)


def load_builtin(version: str = "v1") -> list[ConflictItem]:
    """Load the built-in conflict items of ``version`` (one of :data:`BUILTIN_VERSIONS`)."""
    if version not in BUILTIN_VERSIONS:
        raise ValueError(f"unknown built-in version {version!r}; known: {BUILTIN_VERSIONS}")
    path = resources.files("spare_tl.data").joinpath("builtin", f"conflicts-{version}.jsonl")
    text = path.read_text(encoding="utf-8")
    return [ConflictItem.from_dict(json.loads(line)) for line in text.splitlines() if line]
