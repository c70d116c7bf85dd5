"""The NQ-Swap schema that every conflict dataset is mapped to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConflictItem:
    """One knowledge conflict (NQ-Swap's field names).

    ``org_context`` states the true answer M (``org_answer``); ``sub_context`` is the same
    passage with every mention of M replaced by another entity C (``sub_answer``).
    """

    question: str
    org_context: str
    org_answer: tuple[str, ...]
    sub_context: str
    sub_answer: tuple[str, ...]
    relation: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "org_answer", tuple(self.org_answer))
        object.__setattr__(self, "sub_answer", tuple(self.sub_answer))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["org_answer"] = list(self.org_answer)
        d["sub_answer"] = list(self.sub_answer)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConflictItem:
        return cls(
            question=d["question"],
            org_context=d["org_context"],
            org_answer=tuple(d["org_answer"]),
            sub_context=d["sub_context"],
            sub_answer=tuple(d["sub_answer"]),
            relation=d.get("relation", ""),
            extra=dict(d.get("extra", {})),
        )
