"""The paper's prompt format, demonstration types, seeded k-shot sampling and the pool split.

One demonstration, then the test item::

    context: <ctx>\\nquestion: <q>\\nanswer: <a>\\n\\n   ... k times ...
    context: <sub_context>\\nquestion: <q>\\nanswer:

Demonstration types say which context and answer the demonstrations show: ``dss``
(sub_context, sub_answer: follow the context), ``dso`` (sub_context, org_answer: follow
memory), ``doo`` (org_context, org_answer: no conflict), and ``closed`` (no context).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from spare_tl.data.schema import ConflictItem

DemoType = Literal["dss", "dso", "doo", "closed"]
DEMO_TYPES: tuple[str, ...] = ("dss", "dso", "doo", "closed")
DEFAULT_POOL_SIZE = 128
DEFAULT_POOL_SEED = 42


def _check_demo_type(demo_type: str) -> None:
    if demo_type not in DEMO_TYPES:
        raise ValueError(f"unknown demonstration type {demo_type!r}: use one of {DEMO_TYPES}")


def demonstration(item: ConflictItem, demo_type: str) -> str:
    """One demonstration block (ends with a blank line)."""
    _check_demo_type(demo_type)
    if demo_type == "closed":
        return f"question: {item.question}\nanswer: {item.org_answer[0]}\n\n"
    context = item.org_context if demo_type == "doo" else item.sub_context
    answer = item.sub_answer[0] if demo_type == "dss" else item.org_answer[0]
    return f"context: {context}\nquestion: {item.question}\nanswer: {answer}\n\n"


def conflict_prompt(
    item: ConflictItem,
    demonstrations: Sequence[ConflictItem] = (),
    demo_type: str = "doo",
    context: Literal["sub", "org"] = "sub",
) -> str:
    """The test prompt for ``item`` with its conflicting (``sub``) or original context."""
    head = "".join(demonstration(d, demo_type) for d in demonstrations)
    ctx = item.sub_context if context == "sub" else item.org_context
    return f"{head}context: {ctx}\nquestion: {item.question}\nanswer:"


@dataclass(frozen=True, init=False)
class Questions:
    """Conflict items to ask, each with its own demonstrations, in one demonstration type.

    What a steering method answers (:mod:`spare_tl.methods`); built once, checked once.
    """

    items: tuple[ConflictItem, ...]
    demonstrations: tuple[tuple[ConflictItem, ...], ...]
    demo_type: str

    def __init__(
        self,
        items: Sequence[ConflictItem],
        demonstrations: Sequence[Sequence[ConflictItem]],
        demo_type: str = "doo",
    ) -> None:
        if len(items) != len(demonstrations):
            raise ValueError(
                f"give one list of demonstrations per item ({len(items)} items, "
                f"{len(demonstrations)} demonstration lists)"
            )
        _check_demo_type(demo_type)
        object.__setattr__(self, "items", tuple(items))
        object.__setattr__(self, "demonstrations", tuple(tuple(d) for d in demonstrations))
        object.__setattr__(self, "demo_type", demo_type)

    def __len__(self) -> int:
        return len(self.items)

    def prompts(self, demo_type: str | None = None) -> list[str]:
        """The test prompts, demonstrations shown as ``demo_type`` (default: the questions')."""
        shown = demo_type or self.demo_type
        return [conflict_prompt(it, d, shown) for it, d in zip(self.items, self.demonstrations)]


def closed_book_prompt(item: ConflictItem, demonstrations: Sequence[ConflictItem] = ()) -> str:
    """A closed-book prompt (no context): used to find what the model has memorised."""
    head = "".join(demonstration(d, "closed") for d in demonstrations)
    return f"{head}question: {item.question}\nanswer:"


def question_key(item: ConflictItem) -> str:
    """The question, lower-cased with whitespace collapsed: what makes two items the same."""
    return " ".join(item.question.lower().split())


def sample_demonstrations(
    pool: Sequence[ConflictItem], k: int, seed: int, exclude: ConflictItem | None = None
) -> list[ConflictItem]:
    """``k`` demonstrations from ``pool`` (seeded), never the test question itself."""
    candidates = [d for d in pool if exclude is None or question_key(d) != question_key(exclude)]
    if k > len(candidates):
        raise ValueError(f"cannot sample {k} demonstrations from a pool of {len(candidates)}")
    return random.Random(seed).sample(candidates, k)


@dataclass(frozen=True)
class PoolSplit:
    """The demonstration pool (development set) and the evaluation items, disjoint."""

    pool: list[ConflictItem]
    evaluation: list[ConflictItem]
    seed: int


def split_pool(
    items: Sequence[ConflictItem], pool_size: int = DEFAULT_POOL_SIZE, seed: int = DEFAULT_POOL_SEED
) -> PoolSplit:
    """Hold out ``pool_size`` distinct questions (seeded) as the demonstration pool.

    Items sharing a question go to the same side, so a pool question never appears as an
    evaluation item. The evaluation items are interleaved across relations (round-robin over
    the relations, each in question order), so its first n items, the usual held-out slice,
    span every relation instead of the alphabetically first ones.
    """
    groups: dict[str, list[ConflictItem]] = {}
    for item in items:
        groups.setdefault(question_key(item), []).append(item)
    keys = sorted(groups)
    if pool_size < 1:
        raise ValueError(f"pool size must be >= 1, got {pool_size}")
    if not keys:
        raise ValueError(
            "no items to split into a pool and evaluation items: 0 questions are memorised "
            "(or the dataset is empty)"
        )
    if pool_size >= len(keys):
        raise ValueError(
            f"pool size {pool_size} leaves no evaluation items ({len(keys)} distinct questions)"
        )
    chosen = set(random.Random(seed).sample(keys, pool_size))
    pool = [groups[k][0] for k in keys if k in chosen]
    by_relation: dict[str, list[str]] = {}
    for k in keys:
        if k not in chosen:
            by_relation.setdefault(groups[k][0].relation, []).append(k)
    queues = [by_relation[r] for r in sorted(by_relation)]
    depth = max((len(q) for q in queues), default=0)
    order = [q[i] for i in range(depth) for q in queues if i < len(q)]
    evaluation = [it for k in order for it in groups[k]]
    return PoolSplit(pool=pool, evaluation=evaluation, seed=seed)
