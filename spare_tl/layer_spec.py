"""The one layer-range syntax of every command: ``6-20``, ``6 7 10-12`` or ``6,8,10-12``."""

from __future__ import annotations

import re
from collections.abc import Sequence


def parse_layers(specs: Sequence[str]) -> list[int]:
    """``["6-20"]``, ``["6", "7", "10-12"]`` or ``["6,8,10-12"]`` → sorted unique layers."""
    out: set[int] = set()
    for spec in specs:
        for part in str(spec).replace(",", " ").split():
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"cannot read layer spec {part!r}: use e.g. 6-20 or 6 7 8")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"empty layer range {part!r}")
            out.update(range(lo, hi + 1))
    if not out:
        raise ValueError("no layers given")
    return sorted(out)
