"""Build the built-in offline knowledge-conflict set from the curated fact tables.

Each ``builtin/facts/<relation>.json`` holds one relation: a question template, several
passage templates and the facts (subject, answer, aliases). For every fact the builder
renders ``org_context`` from a template with the true answer, then draws a substitute
answer of the same relation (seeded, deterministic) and renders ``sub_context`` from the
*same* template, so every mention of the answer is replaced, NQ-Swap style.

    spare-tl data build-builtin                 # rebuild conflicts-v1.jsonl
    spare-tl data build-builtin --check         # exit 1 if the shipped file differs
    spare-tl data build-builtin --cross-check   # compare tables with PyPI data packages

The cross-check needs ``countryinfo``, ``pycountry``, ``us`` and ``periodictable``; they are
only used here, never at runtime.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import normalize_answer

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
FACTS_DIR = BUILTIN_DIR / "facts"
VERSION = "v1"
SEED = 0
OUTPUT = BUILTIN_DIR / f"conflicts-{VERSION}.jsonl"


def mentions(text: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as whole words, after SQuAD normalisation."""
    needle = normalize_answer(answer)
    return bool(needle) and f" {needle} " in f" {normalize_answer(text)} "


@dataclass(frozen=True)
class Fact:
    """One curated fact: ``answer`` (canonical form) plus accepted ``aliases``."""

    subject: str
    answer: str
    aliases: tuple[str, ...] = ()
    fields: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def candidates(self) -> tuple[str, ...]:
        return _dedupe((self.answer, *self.aliases))


@dataclass(frozen=True)
class RelationTable:
    """A relation's question template, passage templates and facts."""

    relation: str
    source: str
    question: str
    templates: tuple[str, ...]
    facts: tuple[Fact, ...]


def _dedupe(texts: Sequence[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for t in texts:
        key = normalize_answer(t)
        if key and key not in seen:
            seen.add(key)
            out.append(t)
    return tuple(out)


def load_table(path: Path) -> RelationTable:
    """Read one ``facts/<relation>.json`` file."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    facts = []
    for f in raw["facts"]:
        extra = {k: v for k, v in f.items() if k not in ("subject", "answer", "aliases")}
        facts.append(Fact(f["subject"], f["answer"], tuple(f.get("aliases", ())), extra))
    return RelationTable(
        relation=raw["relation"],
        source=raw["source"],
        question=raw["question"],
        templates=tuple(raw["templates"]),
        facts=tuple(facts),
    )


def load_tables(facts_dir: Path = FACTS_DIR) -> list[RelationTable]:
    """All relation tables, sorted by relation name."""
    tables = [load_table(p) for p in sorted(facts_dir.glob("*.json"))]
    return sorted(tables, key=lambda t: t.relation)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _with_article(text: str) -> str:
    return ("an " if text[:1].lower() in "aeiou" else "a ") + text


def render(template: str, fact: Fact, answer: str) -> str:
    """Fill a question or passage template for ``fact`` stating ``answer``."""
    values = dict(fact.fields)
    values.update(
        subject=fact.subject,
        Subject=_capitalize(fact.subject),
        a_subject=_with_article(fact.subject),
        A_subject=_capitalize(_with_article(fact.subject)),
        answer=answer,
        Answer=_capitalize(answer),
        a_answer=_with_article(answer),
        A_answer=_capitalize(_with_article(answer)),
    )
    return template.format_map(values)


def _substitute_ok(
    fact: Fact, question: str, sub_context: str, sub: str, sub_aliases: Sequence[str]
) -> bool:
    org_keys = {normalize_answer(c) for c in fact.candidates}
    sub_keys = {normalize_answer(c) for c in (sub, *sub_aliases)}
    if org_keys & sub_keys:
        return False
    if any(mentions(sub_context, c) for c in fact.candidates):
        return False
    if mentions(question, sub) or mentions(fact.subject, sub):
        return False
    return mentions(sub_context, sub)


def build_relation(table: RelationTable, seed: int = SEED) -> list[ConflictItem]:
    """Conflict items for one relation; substitutes are drawn with a per-relation seed."""
    rng = random.Random(f"{seed}:{table.relation}")
    answers = _dedupe([f.answer for f in table.facts])
    aliases: dict[str, list[str]] = {normalize_answer(a): [] for a in answers}
    for f in table.facts:
        aliases[normalize_answer(f.answer)].extend(f.aliases)

    items = []
    for fact in table.facts:
        question = render(table.question, fact, fact.answer)
        template = rng.choice(table.templates)
        org_context = render(template, fact, fact.answer)
        if not mentions(org_context, fact.answer):
            raise ValueError(f"{table.relation}: {fact.answer!r} not in {org_context!r}")
        if any(mentions(question, c) for c in fact.candidates):
            raise ValueError(f"{table.relation}: the question gives away {fact.answer!r}")
        for sub in rng.sample(answers, len(answers)):
            sub_context = render(template, fact, sub)
            sub_aliases = _dedupe(aliases[normalize_answer(sub)])
            if _substitute_ok(fact, question, sub_context, sub, sub_aliases):
                break
        else:
            raise ValueError(f"{table.relation}: no valid substitute for {fact.subject!r}")
        shown = [a for a in sub_aliases if mentions(sub_context, a)]
        items.append(
            ConflictItem(
                question=question,
                org_context=org_context,
                org_answer=fact.candidates,
                sub_context=sub_context,
                sub_answer=_dedupe((sub, *shown)),
                relation=table.relation,
            )
        )
    return items


def build_items(tables: Sequence[RelationTable], seed: int = SEED) -> list[ConflictItem]:
    """All conflict items, relation by relation; rejects duplicate questions."""
    items = [item for table in tables for item in build_relation(table, seed)]
    seen: set[str] = set()
    for item in items:
        key = normalize_answer(item.question)
        if key in seen:
            raise ValueError(f"duplicate question: {item.question!r}")
        seen.add(key)
    return items


def to_jsonl(items: Sequence[ConflictItem]) -> str:
    """One JSON object per line, schema fields plus ``relation``."""
    return "".join(json.dumps(i.to_dict(), ensure_ascii=False) + "\n" for i in items)


def write_atomic(text: str, path: Path) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- cross-check (optional)


def _agrees(ours: Sequence[str], theirs: str) -> bool:
    return any(normalize_answer(c) == normalize_answer(theirs) for c in ours)


def _countryinfo_lookup() -> dict[str, dict[str, Any]]:
    from countryinfo import CountryInfo

    data = CountryInfo.all()
    names = {
        "east timor": "east timor",
        "north macedonia": "republic of macedonia",
        "micronesia": "federated states of micronesia",
        "czechia": "czech republic",
    }

    table = {}
    for key, value in data.items():
        table[key] = value
        table[key.removeprefix("the ")] = value
    for ours, theirs in names.items():
        table[ours] = data[theirs]
    return table


def _country_key(subject: str) -> str:
    return subject.lower().removeprefix("the ")


def cross_check(tables: Sequence[RelationTable]) -> dict[str, list[str]]:
    """Compare tables with PyPI data packages; returns mismatch notes per relation.

    Relations without a package are absent from the result.
    """
    by_name = {t.relation: t for t in tables}
    report: dict[str, list[str]] = {}

    import periodictable
    import pycountry
    import us

    countries = _countryinfo_lookup()

    def country(subject: str) -> dict[str, Any]:
        return countries.get(_country_key(subject)) or countries.get(subject.lower()) or {}

    notes = report.setdefault("country_capital", [])
    for f in by_name["country_capital"].facts:
        theirs = country(f.subject).get("capital")
        if isinstance(theirs, list):
            theirs = theirs[0] if theirs else None
        if not theirs or not _agrees(f.candidates, str(theirs)):
            notes.append(f"{f.subject}: ours {f.answer!r}, countryinfo {theirs!r}")

    notes = report.setdefault("country_currency", [])
    for f in by_name["country_currency"].facts:
        code = f.fields["iso4217"]
        cur = pycountry.currencies.get(alpha_3=code)
        if cur is None:
            notes.append(f"{f.subject}: {code} is not an ISO 4217 code in pycountry")
        theirs = country(f.subject).get("currencies") or []
        if code not in theirs:
            notes.append(f"{f.subject}: ours {code} ({f.answer}), countryinfo {theirs}")

    notes = report.setdefault("country_language", [])
    for f in by_name["country_language"].facts:
        code = f.fields["iso639_1"]
        lang = pycountry.languages.get(alpha_2=code)
        if lang is None or not any(mentions(lang.name, c) for c in f.candidates):
            notes.append(f"{f.subject}: {code} is {getattr(lang, 'name', None)!r} in pycountry")
        theirs = country(f.subject).get("languages") or []
        if code not in theirs:
            notes.append(f"{f.subject}: ours {code} ({f.answer}), countryinfo {theirs}")

    for relation, attr in (("us_state_capital", "capital"), ("us_state_abbreviation", "abbr")):
        notes = report.setdefault(relation, [])
        for f in by_name[relation].facts:
            state = us.states.lookup(f.subject)
            theirs = getattr(state, attr, None) if state else None
            if theirs is None or not _agrees(f.candidates, theirs):
                notes.append(f"{f.subject}: ours {f.answer!r}, us {theirs!r}")

    checks = {
        "element_symbol": lambda f: periodictable.elements.name(f.subject).symbol,
        "element_name": lambda f: periodictable.elements.symbol(f.subject).name,
        "element_atomic_number": lambda f: str(periodictable.elements.name(f.subject).number),
    }
    for relation, theirs_of in checks.items():
        notes = report.setdefault(relation, [])
        for f in by_name[relation].facts:
            theirs = theirs_of(f)
            if not _agrees(f.candidates, theirs):
                notes.append(f"{f.subject}: ours {f.answer!r}, periodictable {theirs!r}")
    return report


def relation_counts(items: Sequence[ConflictItem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.relation] = counts.get(item.relation, 0) + 1
    return counts
