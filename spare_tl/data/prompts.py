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


DEFAULT_DEVELOPMENT_SHARE = 1 / 3


def relation_histogram(items: Sequence[ConflictItem]) -> dict[str, int]:
    """How many items of each relation (sorted by relation): the shape of a question set."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it.relation] = counts.get(it.relation, 0) + 1
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class PoolSplit:
    """The demonstration pool, the development questions and the test questions: disjoint.

    ``development`` and ``test`` split the held-out questions per relation (seeded), so both
    cover every relation in proportion; each is ordered so that any first ``n`` of it is
    itself spread over the relations in proportion (the usual held-out slice
    ``test[:200]``). Tune on ``development``, report on ``test``.
    """

    pool: list[ConflictItem]
    development: list[ConflictItem]
    test: list[ConflictItem]
    seed: int

    def histograms(self) -> dict[str, dict[str, int]]:
        """The relation histogram of the pool, the development and the test questions."""
        return {
            "pool": relation_histogram(self.pool),
            "development": relation_histogram(self.development),
            "test": relation_histogram(self.test),
        }


def proportional_order(groups: dict[str, list[str]]) -> list[str]:
    """Interleave per-relation lists so every prefix holds each relation in proportion.

    Element ``i`` of a relation with ``n`` elements sits at ``i / n``; the merged order
    sorts by that position (ties by relation). So the first ``k`` of the result hold every
    relation once ``k`` reaches the number of relations, and about ``k * n / total`` of each
    (within one) after that.
    """
    keyed = [
        (i / len(members), relation, i, key)
        for relation, members in groups.items()
        for i, key in enumerate(members)
    ]
    return [key for *_, key in sorted(keyed)]


def split_pool(
    items: Sequence[ConflictItem],
    pool_size: int = DEFAULT_POOL_SIZE,
    seed: int = DEFAULT_POOL_SEED,
    development_share: float = DEFAULT_DEVELOPMENT_SHARE,
) -> PoolSplit:
    """Hold out ``pool_size`` distinct questions (seeded) as the demonstration pool, then
    split the rest per relation into development and test questions.

    Items sharing a question go to the same side, so no question is in two sets. Within each
    relation the held-out questions are shuffled (seeded) and ``development_share`` of them
    (rounded, at least one when the relation has 2 or more, never all) go to development, the
    rest to test; both lists are ordered by :func:`proportional_order`.
    """
    groups: dict[str, list[ConflictItem]] = {}
    for item in items:
        groups.setdefault(question_key(item), []).append(item)
    keys = sorted(groups)
    if pool_size < 1:
        raise ValueError(f"pool size must be >= 1, got {pool_size}")
    if not 0 < development_share < 1:
        raise ValueError(f"development share must be in (0, 1), got {development_share}")
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
    development: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for relation, members in sorted(by_relation.items()):
        shuffled = list(members)
        random.Random(f"{seed}:{relation}").shuffle(shuffled)
        n_dev = round(len(shuffled) * development_share)
        n_dev = min(max(n_dev, 1 if len(shuffled) >= 2 else 0), len(shuffled) - 1)
        if n_dev:
            development[relation] = shuffled[:n_dev]
        test[relation] = shuffled[n_dev:]
    return PoolSplit(
        pool=pool,
        development=[it for k in proportional_order(development) for it in groups[k]],
        test=[it for k in proportional_order(test) for it in groups[k]],
        seed=seed,
    )
