"""The shipped built-in conflict set: size, NQ-Swap invariants, deterministic rebuild."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from spare_tl.data import build_builtin
from spare_tl.data.builtin import BUILTIN_VERSIONS, load_builtin
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import normalize_answer

SHIPPED = build_builtin.BUILTIN_DIR / "conflicts-v1.jsonl"
FIELDS = {"question", "org_context", "org_answer", "sub_context", "sub_answer", "relation"}
# Kept out of the built-in set on purpose (reserved for an independent check).
FORBIDDEN = re.compile(r"landmark|located|location|where is|in which (country|city)|city_country")


def occurs(text: str, answer: str) -> bool:
    needle = normalize_answer(answer)
    return bool(needle) and f" {needle} " in f" {normalize_answer(text)} "


@pytest.fixture(scope="module")
def items() -> list[ConflictItem]:
    return load_builtin("v1")


def test_an_unknown_builtin_version_is_refused() -> None:
    assert "v1" in BUILTIN_VERSIONS
    with pytest.raises(ValueError, match="unknown built-in version"):
        load_builtin("v0")


def test_rows_have_exactly_the_schema_fields() -> None:
    for line in SHIPPED.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert set(row) == FIELDS
        assert row["org_answer"] and row["sub_answer"]
        assert all(isinstance(a, str) and a.strip() for a in row["org_answer"] + row["sub_answer"])


def test_size_and_relations(items: list[ConflictItem]) -> None:
    counts = Counter(i.relation for i in items)
    assert len(items) >= 2000
    assert len(counts) >= 10
    assert all(n >= 40 for n in counts.values()), counts


def test_no_forbidden_relations(items: list[ConflictItem]) -> None:
    for item in items:
        assert not FORBIDDEN.search(item.relation)
        assert not FORBIDDEN.search(item.question.lower()), item.question


def test_no_duplicate_questions(items: list[ConflictItem]) -> None:
    keys = Counter(normalize_answer(i.question) for i in items)
    assert [q for q, n in keys.items() if n > 1] == []


def test_context_and_memory_answers_differ(items: list[ConflictItem]) -> None:
    for item in items:
        org = {normalize_answer(a) for a in item.org_answer}
        sub = {normalize_answer(a) for a in item.sub_answer}
        assert not org & sub, item


def test_org_answer_in_org_context(items: list[ConflictItem]) -> None:
    for item in items:
        assert occurs(item.org_context, item.org_answer[0]), item


def test_sub_answer_in_sub_context(items: list[ConflictItem]) -> None:
    for item in items:
        assert all(occurs(item.sub_context, a) for a in item.sub_answer), item


def test_no_org_answer_left_in_sub_context(items: list[ConflictItem]) -> None:
    for item in items:
        left = [a for a in item.org_answer if occurs(item.sub_context, a)]
        assert left == [], (item.sub_context, left)


def test_question_gives_neither_answer_away(items: list[ConflictItem]) -> None:
    for item in items:
        assert not any(occurs(item.question, a) for a in item.org_answer), item
        assert not any(occurs(item.question, a) for a in item.sub_answer), item


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _swap(text: str, old: str, new: str) -> str:
    """Replace whole-word mentions of ``old`` (with a leading a/an) by ``new``, capitalising
    ``new`` at the start of a sentence as the templates do."""

    def replace(m: re.Match[str]) -> str:
        at_start = m.start() == 0 or text[: m.start()].endswith(". ")
        phrase = f"{_article(new)} {new}" if m.group(1) else new
        return phrase[:1].upper() + phrase[1:] if at_start else phrase

    first = re.escape(old[:1].lower()) + "|" + re.escape(old[:1].upper())
    pattern = rf"(?<!\w)((?:[Aa]n?) )?(?:{first}){re.escape(old[1:])}(?!\w)"
    return re.sub(pattern, replace, text)


def test_sub_context_is_the_org_passage_with_the_answer_swapped(items: list[ConflictItem]) -> None:
    for item in items:
        assert _swap(item.org_context, item.org_answer[0], item.sub_answer[0]) == item.sub_context


def test_templates_are_short_and_varied() -> None:
    for table in build_builtin.load_tables():
        assert len(set(table.templates)) >= 3, table.relation
        for template in table.templates:
            sentences = template.rstrip(".").count(". ") + 1
            assert 1 <= sentences <= 3, template


def test_fact_tables_are_documented() -> None:
    tables = build_builtin.load_tables()
    readme = (build_builtin.BUILTIN_DIR / "README.md").read_text(encoding="utf-8")
    for table in tables:
        assert table.source.strip(), table.relation
        assert f"`{table.relation}`" in readme, table.relation
        assert Path(build_builtin.FACTS_DIR / f"{table.relation}.json").is_file()


def test_rebuild_is_deterministic_and_matches_the_shipped_file() -> None:
    text = build_builtin.to_jsonl(build_builtin.build_items(build_builtin.load_tables()))
    assert text == SHIPPED.read_text(encoding="utf-8")


def test_write_atomic(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "x.jsonl"
    build_builtin.write_atomic("a\n", out)
    build_builtin.write_atomic("b\n", out)
    assert out.read_text(encoding="utf-8") == "b\n"
    assert [p.name for p in out.parent.iterdir()] == ["x.jsonl"]


def test_pool_split_orders_development_and_test_by_relation(items: list[ConflictItem]) -> None:
    from spare_tl.data.prompts import split_pool

    split = split_pool(items, 128, 42)
    relations = sorted({it.relation for it in split.test})
    first = split.test[: len(relations)]
    assert sorted(it.relation for it in first) == relations  # every relation once, up front
    pool_questions = {it.question for it in split.pool}
    held_out = split.development + split.test
    assert not pool_questions & {it.question for it in held_out}
    assert len(split.pool) + len(held_out) == len(items)  # no duplicate questions here
    assert split_pool(items, 128, 42) == split
