"""``spare-tl results``, ``spare-tl conflict-table`` and ``spare-tl upgrade-cache``.

``results`` evaluates the committed feature set on held-out questions
(:func:`spare_tl.studies.results.run_results`) and prints the table that ``spare-tl docs``
puts into ``docs/results.md``; ``conflict-table`` measures how the model behaves under
knowledge conflict per relation (:mod:`spare_tl.studies.conflict_table`); ``upgrade-cache``
brings a cache written by an earlier spare-tl up to the current layout
(:mod:`spare_tl.stages.migrations`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from spare_tl.cli.args import add_dtype_argument
from spare_tl.cli.docs import results_table
from spare_tl.embedded import EMBEDDED_MODEL
from spare_tl.studies.results import CASES


def register(sub: Any) -> None:
    """Add ``results``, ``conflict-table`` and ``upgrade-cache``."""
    p = sub.add_parser(
        "results",
        help="held-out results of the committed features (writes cache_data/<model>/results/)",
        description=(
            "Evaluate the embedded model's committed functional features on held-out memorised "
            "questions: doo (no steering, to context, to memory), dso (to context), dss (to "
            "memory); `spare-tl docs` turns the JSON into docs/results.md."
        ),
    )
    p.add_argument("--n-items", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument(
        "--demonstrations",
        default="per_seed",
        choices=["per_seed", "per_item"],
        help="one demonstration set per seed (the paper's protocol; results/<case>.json) or "
        "each question its own (results/<case>-per_item.json, to compare the two)",
    )
    add_dtype_argument(p)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take a case's saved results when they were made with the same features, "
        "questions and seeds (e.g. after running the cases in parallel processes)",
    )
    p.set_defaults(func=_results)

    c = sub.add_parser(
        "conflict-table",
        help="how the model behaves under knowledge conflict, per relation (Markdown)",
    )
    c.add_argument("--output", default="docs/conflict_behaviour.md")
    c.add_argument("--per-relation", type=int, default=25, help="items per relation (0: all)")
    c.add_argument("--shots", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    add_dtype_argument(c)
    c.set_defaults(func=_conflict_table)

    u = sub.add_parser(
        "upgrade-cache", help="bring a cache written by an earlier spare-tl to today's layout"
    )
    u.add_argument("model_dir", type=Path, help="e.g. cache_data/smollm2-135m-instruct")
    u.add_argument("--dataset", default="builtin", help="the memorised set's dataset")
    u.set_defaults(func=_upgrade_cache)


def _results(args: argparse.Namespace) -> int:
    import torch

    from spare_tl import cache, checks
    from spare_tl.cli.args import check_steering_folders
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
    from spare_tl.stages.memorised import memorised_split
    from spare_tl.studies.results import run_results

    checks.at_least(args.n_items, 1, "--n-items")
    check_steering_folders(DEFAULT_FEATURES, DEFAULT_SAES)
    checks.output_dir(cache.default_cache_root(), "the cache root (SPARE_TL_CACHE)")
    torch.set_grad_enabled(False)
    start = time.time()
    model, features, saes = load_steering_setup(DEFAULT_FEATURES, DEFAULT_SAES, dtype=args.dtype)
    split = memorised_split(model, features, "builtin")
    results = run_results(
        model,
        features,
        saes,
        split,
        n_items=args.n_items,
        seeds=args.seeds,
        cases=args.cases,
        reuse=args.reuse,
        demonstrations=args.demonstrations,
    )
    print(results_table(results))
    seeds = " ".join(map(str, args.seeds))
    print(
        f"\nRegenerate: `spare-tl results --n-items {args.n_items} --seeds {seeds} "
        f"--cases {' '.join(args.cases)} --demonstrations {args.demonstrations}` "
        f"({time.time() - start:.0f} s)."
    )
    print("docs/results.md is regenerated from these JSON files by `spare-tl docs`")
    return 0


def _conflict_table(args: argparse.Namespace) -> int:
    import torch

    from spare_tl import checks
    from spare_tl.cache import write_text_atomic
    from spare_tl.data.datasets import load_dataset
    from spare_tl.data.prompts import split_pool
    from spare_tl.hardware import resolve_dtype
    from spare_tl.models import load_model
    from spare_tl.stages.memorised import find_memorised
    from spare_tl.studies.conflict_table import conflict_behaviour, to_markdown

    checks.output_file(args.output)
    torch.set_grad_enabled(False)
    start = time.time()
    model = load_model(EMBEDDED_MODEL, dtype=resolve_dtype(args.dtype))
    items = load_dataset("builtin")
    memorised = find_memorised(model, items, dataset_name="builtin")
    split = split_pool(memorised.filter(items), 128, 42)
    per_rel: dict[str, list[Any]] = defaultdict(list)
    for it in split.test:
        if not args.per_relation or len(per_rel[it.relation]) < args.per_relation:
            per_rel[it.relation].append(it)
    chosen = [it for rel in sorted(per_rel) for it in per_rel[rel]]
    table = conflict_behaviour(model, chosen, split.pool, n_shots=args.shots, seed=args.seed)
    meta = {
        "model": model.cfg.model_name,
        "dataset": "builtin",
        "memorised_shots": memorised.config.get("n_shots"),
        "n_shots": args.shots,
        "seed": args.seed,
        "command": " ".join(["spare-tl", *map(shlex.quote, sys.argv[1:])]),
        "seconds": time.time() - start,
    }
    text = to_markdown(table, memorised.per_relation(), meta)
    write_text_atomic(Path(args.output), text)
    print(text)
    return 0


def _upgrade_cache(args: argparse.Namespace) -> int:
    from spare_tl.stages.migrations import upgrade_model_cache

    for line in upgrade_model_cache(args.model_dir, args.dataset):
        print(line)
    return 0
