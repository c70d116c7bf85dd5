"""The NQ-Swap schema that every conflict dataset is mapped to."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spare_tl.data.scoring import normalize_answer
from spare_tl.errors import DatasetError


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


def items_hash(items: Iterable[ConflictItem]) -> str:
    """A short hash of the items' whole content (questions, contexts, answers, relations,
    extra fields) and order: a dataset's identity in the cache, whatever its file is called."""
    text = json.dumps([it.to_dict() for it in items], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Reading and validating user JSONL files
# --------------------------------------------------------------------------------------

_TEXT_FIELDS = ("question", "org_context", "sub_context")
_ANSWER_FIELDS = ("org_answer", "sub_answer")
REQUIRED_FIELDS = ("question", "org_context", "org_answer", "sub_context", "sub_answer")
_OPTIONAL_FIELDS = ("relation", "extra")
_ANSWER_CONTEXT = {"org_answer": "org_context", "sub_answer": "sub_context"}


@dataclass(frozen=True)
class ValidationIssue:
    """One problem in a JSONL file: its 1-based line, the field (if any) and what is wrong."""

    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class ValidationReport:
    """What :func:`validate_conflict_jsonl` found: the good items and every problem."""

    path: str
    items: list[ConflictItem]
    errors: list[ValidationIssue]
    relations: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_record(obj: Any, line: int) -> tuple[ConflictItem | None, list[ValidationIssue]]:
    """Validate one decoded JSON value; return the item (if valid) and the problems."""
    if not isinstance(obj, dict):
        return None, [ValidationIssue(line, None, f"expected a JSON object, got {_json_type(obj)}")]
    issues: list[ValidationIssue] = []

    def bad(field_name: str | None, message: str) -> None:
        issues.append(ValidationIssue(line, field_name, message))

    for name in REQUIRED_FIELDS:
        if name not in obj:
            bad(name, "missing field")
    for name in _TEXT_FIELDS:
        value = obj.get(name)
        if name not in obj:
            continue
        if not isinstance(value, str):
            bad(name, f"expected a string, got {_json_type(value)}")
        elif not value.strip():
            bad(name, "empty string")
    answers_ok: dict[str, bool] = {}
    for name in _ANSWER_FIELDS:
        if name not in obj:
            continue
        value = obj[name]
        answers_ok[name] = False
        if not isinstance(value, list):
            hint = ' (wrap it in a list: ["..."])' if isinstance(value, str) else ""
            bad(name, f"expected a list of strings, got {_json_type(value)}{hint}")
        elif not value:
            bad(name, "empty answer list")
        else:
            elem_ok = True
            for i, a in enumerate(value):
                if not isinstance(a, str):
                    bad(name, f"answer {i}: expected a string, got {_json_type(a)}")
                    elem_ok = False
                elif not normalize_answer(a):
                    what = "empty string" if not a.strip() else "normalises to an empty string"
                    bad(name, f"answer {i} ({a!r}): {what}")
                    elem_ok = False
            answers_ok[name] = elem_ok
    if "relation" in obj and not isinstance(obj["relation"], str):
        bad("relation", f"expected a string, got {_json_type(obj['relation'])}")
    if "extra" in obj and not isinstance(obj["extra"], dict):
        bad("extra", f"expected an object, got {_json_type(obj['extra'])}")

    # Cross-field checks only once the fields they read are well-formed.
    for ans_name, ctx_name in _ANSWER_CONTEXT.items():
        ctx = obj.get(ctx_name)
        if answers_ok.get(ans_name) and isinstance(ctx, str) and ctx.strip():
            norm_ctx = normalize_answer(ctx)
            if not any(normalize_answer(a) in norm_ctx for a in obj[ans_name]):
                bad(ans_name, f"no answer in {obj[ans_name]!r} occurs in {ctx_name}")
    if answers_ok.get("org_answer") and answers_ok.get("sub_answer"):
        shared = {normalize_answer(a) for a in obj["org_answer"]} & {
            normalize_answer(a) for a in obj["sub_answer"]
        }
        if shared:
            bad("sub_answer", f"shares {sorted(shared)!r} with org_answer: not a conflict")

    if issues:
        return None, issues
    extra = dict(obj.get("extra", {}))
    for key, value in obj.items():  # keep unknown top-level keys rather than drop them
        if key not in REQUIRED_FIELDS and key not in _OPTIONAL_FIELDS:
            extra.setdefault(key, value)
    item = ConflictItem.from_dict({**obj, "extra": extra})
    return item, []


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def validate_conflict_jsonl(path: str | os.PathLike[str]) -> ValidationReport:
    """Check every line of a conflict JSONL file; never raises for bad content.

    Each non-blank line must be a JSON object with ``question``, ``org_context``,
    ``org_answer`` (non-empty list of strings), ``sub_context``, ``sub_answer`` and optionally
    ``relation`` (string) and ``extra`` (object); some ``org_answer`` must occur in
    ``org_context`` and some ``sub_answer`` in ``sub_context`` after normalisation, and the two
    answer lists must not share a normalised answer. Unknown keys are kept in ``extra``.
    Raises ``FileNotFoundError`` only when the file is missing.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a JSONL file of conflict items")
    raw = path.read_bytes()
    items: list[ConflictItem] = []
    errors: list[ValidationIssue] = []
    for line_no, raw_line in enumerate(raw.split(b"\n"), start=1):
        if line_no == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
            raw_line = raw_line[3:]  # tolerate a UTF-8 byte-order mark
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(
                ValidationIssue(
                    line_no,
                    None,
                    f"not valid UTF-8 (byte 0x{raw_line[e.start]:02x} at column {e.start + 1})",
                )
            )
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(
                ValidationIssue(line_no, None, f"not valid JSON: {e.msg} (column {e.colno})")
            )
            continue
        item, issues = _check_record(obj, line_no)
        errors.extend(issues)
        if item is not None:
            items.append(item)
    if not items and not errors:
        errors.append(ValidationIssue(1, None, "the file holds no items"))
    relations = dict(Counter(item.relation for item in items).most_common())
    return ValidationReport(path=str(path), items=items, errors=errors, relations=relations)


def read_conflict_jsonl(path: str | os.PathLike[str]) -> list[ConflictItem]:
    """Read a conflict JSONL file, or raise :class:`DatasetError` listing every problem."""
    report = validate_conflict_jsonl(path)
    if report.errors:
        raise DatasetError(str(path), report.errors)
    return report.items


def write_conflict_jsonl(items: Iterable[ConflictItem], path: str | os.PathLike[str]) -> None:
    """Write items one JSON object per line (UTF-8), readable by :func:`read_conflict_jsonl`."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
