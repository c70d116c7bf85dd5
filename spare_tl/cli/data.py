"""``spare-tl data``: check a conflict JSONL file, and count a dataset's items."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: How many problems ``data validate`` lists before saying how many more there are.
MAX_LISTED_ERRORS = 20


def register(sub: Any) -> None:
    """Add ``data validate PATH`` and ``data stats NAME_OR_PATH``."""
    data = sub.add_parser("data", help="check and inspect knowledge-conflict datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    validate = data_sub.add_parser(
        "validate",
        help="check a conflict JSONL file line by line",
        description=(
            "Check that every line is a JSON object with question, org_context, org_answer "
            "(list), sub_context, sub_answer (list), that the answers occur in their contexts, "
            "and print a summary, or the problems with their line numbers."
        ),
    )
    validate.add_argument("path", help="JSONL file, one conflict item per line")
    validate.add_argument(
        "--max-errors",
        type=int,
        default=MAX_LISTED_ERRORS,
        help=f"list at most this many problems (default {MAX_LISTED_ERRORS})",
    )
    validate.set_defaults(func=_validate)

    stats = data_sub.add_parser(
        "stats",
        help="count the items of a dataset, per relation",
        description="Load a dataset (builtin[:VERSION], nqswap, macnoise or a .jsonl path) "
        "and print its number of items per relation.",
    )
    stats.add_argument("name_or_path", help="builtin[:VERSION], nqswap, macnoise or a .jsonl path")
    stats.add_argument("--split", default=None, help="hub split (default: the paper's)")
    stats.add_argument("--cache-dir", default=None, help="Hugging Face datasets cache folder")
    stats.add_argument("--limit", type=int, default=None, help="only the first N items")
    stats.set_defaults(func=_stats)

    from spare_tl.data.build_builtin import OUTPUT, SEED

    build = data_sub.add_parser(
        "build-builtin",
        help="regenerate the built-in dataset from its fact tables (maintainers)",
    )
    build.add_argument("--output", type=Path, default=OUTPUT)
    build.add_argument("--seed", type=int, default=SEED)
    build.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if --output differs"
    )
    build.add_argument(
        "--cross-check",
        action="store_true",
        help="compare the tables with countryinfo, pycountry, us and periodictable",
    )
    build.set_defaults(func=_build_builtin)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _print_relations(relations: dict[str, int]) -> None:
    width = max((len(r or "(none)") for r in relations), default=0)
    for relation, count in relations.items():
        print(f"  {relation or '(none)':<{width}}  {count}")


def _validate(args: argparse.Namespace) -> int:
    from spare_tl.data.schema import validate_conflict_jsonl

    report = validate_conflict_jsonl(args.path)
    if report.errors:
        n = len(report.errors)
        print(f"{args.path}: {_plural(n, 'problem')}", file=sys.stderr)
        shown = report.errors[: max(args.max_errors, 0)]
        for issue in shown:
            print(f"  {issue}", file=sys.stderr)
        if n > len(shown):
            print(f"  ... and {n - len(shown)} more", file=sys.stderr)
        return 1
    print(
        f"{args.path}: OK, {_plural(len(report.items), 'item')}, "
        f"{_plural(len(report.relations), 'relation')}"
    )
    _print_relations(report.relations)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from collections import Counter

    from spare_tl.data.datasets import load_dataset

    items = load_dataset(
        args.name_or_path, split=args.split, cache_dir=args.cache_dir, limit=args.limit
    )
    relations = dict(Counter(item.relation for item in items).most_common())
    print(
        f"{args.name_or_path}: {_plural(len(items), 'item')}, {_plural(len(relations), 'relation')}"
    )
    _print_relations(relations)
    return 0


def _build_builtin(args: argparse.Namespace) -> int:
    from spare_tl.data.build_builtin import (
        build_items,
        cross_check,
        load_tables,
        relation_counts,
        to_jsonl,
        write_atomic,
    )

    tables = load_tables()
    items = build_items(tables, args.seed)
    text = to_jsonl(items)
    for relation, n in relation_counts(items).items():
        print(f"{relation:24s} {n:5d}")
    print(f"{'total':24s} {len(items):5d}")

    if args.cross_check:
        try:
            report = cross_check(tables)
        except ImportError as err:
            print(
                f"cross-check skipped: {err} (pip install countryinfo pycountry us periodictable)"
            )
        else:
            for relation, notes in report.items():
                n = len(next(t for t in tables if t.relation == relation).facts)
                print(f"cross-check {relation}: {len(notes)} notes over {n} facts")
                for note in notes:
                    print(f"    {note}")

    if args.check:
        same = args.output.exists() and args.output.read_text(encoding="utf-8") == text
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    write_atomic(text, args.output)
    print(f"wrote {args.output}")
    return 0
