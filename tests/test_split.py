"""The pool / development / test split on the embedded model's real memorised set: every
relation covered in proportion, no question in two sets, the same split every time."""

from __future__ import annotations

import pytest

from spare_tl.data.builtin import load_builtin
from spare_tl.data.prompts import (
    PoolSplit,
    proportional_order,
    question_key,
    relation_histogram,
    split_pool,
)
from spare_tl.embedded import SHIPPED_ROOT
from spare_tl.stages.evaluation import (
    development_items,
    evaluation_demonstrations,
    evaluation_questions,
)
from spare_tl.stages.memorised import MemorisedSet


@pytest.fixture(scope="module")
def split() -> PoolSplit:
    (folder,) = (SHIPPED_ROOT / "smollm2-135m-instruct" / "memorised").iterdir()
    memorised = MemorisedSet.load(folder)
    return split_pool(memorised.filter(load_builtin("v1")), 128, 42)


def test_pool_development_and_test_are_disjoint_and_cover_everything(split: PoolSplit) -> None:
    keys = [
        {question_key(it) for it in part} for part in (split.pool, split.development, split.test)
    ]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    assert sum(map(len, keys)) == 949  # the committed memorised set: 949 questions


def test_every_relation_with_three_held_out_questions_is_in_development_and_test(
    split: PoolSplit,
) -> None:
    held_out = relation_histogram(split.development + split.test)
    dev, test = relation_histogram(split.development), relation_histogram(split.test)
    print("relation  held-out  development  test[:200]")
    head = relation_histogram(split.test[:200])
    for rel, n in held_out.items():
        print(f"{rel:24s} {n:4d} {dev.get(rel, 0):4d} {head.get(rel, 0):4d}")
    needed = [rel for rel, n in held_out.items() if n >= 3]
    assert len(needed) >= 20
    assert [rel for rel in needed if rel not in dev] == []
    assert [rel for rel in needed if rel not in test] == []


def test_the_usual_slices_hold_each_relation_in_proportion(split: PoolSplit) -> None:
    held_out = relation_histogram(split.development + split.test)
    total = sum(held_out.values())
    for part, n in ((split.test, 200), (split.development, 128)):
        counts = relation_histogram(part[:n])
        whole = relation_histogram(part)
        for rel, m in whole.items():
            expected = n * m / len(part)
            assert abs(counts.get(rel, 0) - expected) <= 2, (rel, counts.get(rel), expected)
    # development holds about a third of every relation
    for rel, n in held_out.items():
        dev = relation_histogram(split.development).get(rel, 0)
        assert abs(dev - n / 3) <= 1 or n < 2, (rel, dev, n)
    assert 0.3 < len(split.development) / total < 0.37


def test_the_split_is_seeded(split: PoolSplit) -> None:
    items = split.pool + split.development + split.test
    again = split_pool(items, 128, 42)
    assert again.development == split.development and again.test == split.test
    other = split_pool(items, 128, 43)
    assert other.development != split.development


def test_proportional_order_interleaves_by_share() -> None:
    order = proportional_order({"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1"]})
    assert order == ["a0", "b0", "a1", "a2", "b1", "a3"]


def test_development_items_refuses_more_than_the_split_holds(split: PoolSplit) -> None:
    assert development_items(split.development, 5) == split.development[:5]
    with pytest.raises(ValueError, match="ask for fewer"):
        development_items(split.development, len(split.development) + 1)
    with pytest.raises(ValueError, match="at least 1"):
        development_items(split.development, 0)


def test_one_demonstration_set_per_seed_is_the_default(split: PoolSplit) -> None:
    items = split.test[:20]
    demos = evaluation_demonstrations(items, split.pool, 3, seed=0)
    assert all(d == demos[0] for d in demos) and len(demos[0]) == 3
    assert evaluation_demonstrations(items, split.pool, 3, seed=1)[0] != demos[0]
    per_item = evaluation_demonstrations(items, split.pool, 3, seed=0, sampling="per_item")
    assert len({tuple(question_key(x) for x in d) for d in per_item}) > 10
    prompts = evaluation_questions(items, split.pool, 3, 0).prompts()
    head = prompts[0][: prompts[0].rindex("context: ")]
    assert all(p.startswith(head) for p in prompts)
    with pytest.raises(ValueError, match="unknown demonstration sampling"):
        evaluation_demonstrations(items, split.pool, 3, seed=0, sampling="per_question")


def test_a_pool_question_gets_its_own_draw_under_per_seed_sampling(split: PoolSplit) -> None:
    shared = evaluation_demonstrations(split.test[:1], split.pool, 3, seed=0)[0]
    demos = evaluation_demonstrations([shared[0], split.test[0]], split.pool, 3, seed=0)
    assert question_key(shared[0]) not in {question_key(d) for d in demos[0]}
    assert demos[1] == shared
