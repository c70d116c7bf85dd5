"""``spare-tl baselines``: baselines in SpARE's harness: the same prompts, demonstrations,
decoding, exact match and test questions, one interface, hyper-parameters chosen on the
development set only.

    spare-tl baselines sweep --method actadd      # dev sweep -> baselines/sweep-actadd.json
    spare-tl baselines table                      # held-out table -> JSON (spare-tl docs)

The sweep is :func:`spare_tl.studies.baseline_sweep.sweep_method`, the table
:func:`spare_tl.studies.baselines.run_table`; this module parses the command line, loads the
setup and prints. Imports of the study stay inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from spare_tl.cli.args import add_dtype_argument

# spare_tl.studies.baseline_setup's METHODS, DEFAULT_COEFFICIENTS and DEFAULT_ALPHAS, spelled
# out so that building the parser imports none of the study (tests/test_baselines.py checks).
METHODS = ("none", "closed_book", "spare", "icl", "actadd", "taskvec", "cad")
DEFAULT_COEFFICIENTS = (0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0)


def _add_setup_args(p: argparse.ArgumentParser) -> None:
    add_dtype_argument(p)
    p.add_argument("--features", default=None, help="functional-feature folder (embedded default)")
    p.add_argument("--saes", default=None, help="folder of SAEs (embedded default)")
    p.add_argument("--dataset", default="builtin")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``spare-tl baselines sweep`` and ``spare-tl baselines table``."""
    parser = sub.add_parser(
        "baselines",
        help="baselines (ICL, ActAdd, task vectors, CAD) in SpARE's harness: sweep, table",
        description="Baselines in SpARE's harness: the same prompts, demonstrations, decoding, "
        "exact match and test questions, one interface, hyper-parameters chosen on the "
        "development set only.",
    )
    actions = parser.add_subparsers(dest="baselines_command", metavar="ACTION", required=True)

    p = actions.add_parser("sweep", help="choose a baseline's hyper-parameters on the pool")
    p.add_argument("--method", required=True, choices=[m for m in METHODS if m != "spare"])
    _add_setup_args(p)
    p.add_argument(
        "--layer-sets", nargs="+", default=None, help="ActAdd: e.g. 10-13 12-15 attn_out:20-23"
    )
    p.add_argument("--coefficients", type=float, nargs="+", default=list(DEFAULT_COEFFICIENTS))
    p.add_argument("--layers", type=int, nargs="+", default=None, help="task vector layers")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="CAD |α|")
    p.add_argument("--n-items", type=int, default=128, help="development questions")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--output", default=None, help="sweep JSON (default baselines/sweep-M.json)")
    p.set_defaults(func=run)

    p = actions.add_parser("table", help="evaluate the methods on held-out questions; write table")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    _add_setup_args(p)
    p.add_argument("--n-items", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--reuse", action="store_true", help="reuse saved results of this protocol")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, features, SAEs and memorised split, then run the sweep or the table."""
    import torch

    from spare_tl import checks
    from spare_tl.cli.args import check_dataset, check_steering_folders
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
    from spare_tl.studies.baseline_setup import BaselineSetup

    if args.baselines_command == "sweep" and args.output:
        checks.output_file(args.output)
    check_steering_folders(args.features or DEFAULT_FEATURES, args.saes or DEFAULT_SAES)
    check_dataset(args.dataset)
    torch.set_grad_enabled(False)
    model, _, _ = load_steering_setup(
        args.features or DEFAULT_FEATURES, args.saes or DEFAULT_SAES, dtype=args.dtype
    )
    setup = BaselineSetup.load(args.features, args.saes, args.dataset, model=model)
    if args.baselines_command == "sweep":
        return _sweep_command(args, setup)
    return _table_command(args, setup)


def _sweep_command(args: argparse.Namespace, setup: Any) -> int:
    from spare_tl import cache
    from spare_tl.data.prompts import relation_histogram
    from spare_tl.stages.evaluation import development_items
    from spare_tl.stages.sweep import best_settings, parse_layer_set
    from spare_tl.studies.baseline_sweep import save_method_sweep, sweep_method, sweep_path

    start = time.time()
    layer_sets = [parse_layer_set(s) for s in args.layer_sets] if args.layer_sets else None
    candidates = setup.grid(
        args.method,
        layer_sets=layer_sets,
        coefficients=args.coefficients,
        layers=args.layers,
        alphas=args.alphas,
    )
    items = development_items(setup.development, args.n_items)
    records = sweep_method(setup.model, candidates, items, setup.pool, n_shots=args.shots)
    path = Path(args.output) if args.output else sweep_path(setup.model.cfg.model_name, args.method)
    config = {
        "method": args.method,
        "candidates": [c.hyperparameters("context") for c in candidates],
        "n_items": args.n_items,
        "items": cache.fingerprint([it.question for it in items]),
        "relations": relation_histogram(items),
        "dev_set": f"development questions (split per relation, disjoint from the test), "
        f"the test protocol, one demonstration set per seed "
        f"(doo, {args.shots} shots, demonstration seed 0)",
        "seconds": round(time.time() - start),
    }
    save_method_sweep(records, path, config)
    print(json.dumps({"no_steering": records[0], **best_settings(records)}, indent=1))
    print(f"wrote {path}")
    return 0


def _table_command(args: argparse.Namespace, setup: Any) -> int:
    from spare_tl import cache
    from spare_tl.stages.evaluation import EvaluationConfig
    from spare_tl.studies.baseline_sweep import STAGE
    from spare_tl.studies.baselines import run_table
    from spare_tl.viz.tables import baselines_markdown

    start = time.time()
    config = EvaluationConfig(seeds=tuple(args.seeds), n_shots=args.shots)
    out_dir = cache.stage_dir(setup.model.cfg.model_name, STAGE)
    results = run_table(
        setup, args.methods, config=config, n_items=args.n_items, out_dir=out_dir, reuse=args.reuse
    )
    table = baselines_markdown(results)
    seeds = " ".join(map(str, args.seeds))
    table += (
        f"\nRegenerate: `spare-tl baselines table --methods {' '.join(args.methods)} "
        f"--n-items {args.n_items} --seeds {seeds}` ({time.time() - start:.0f} s"
        + (
            " with `--reuse`, which re-ran only the methods whose saved results were made "
            "with other settings or questions)."
            if args.reuse
            else ")."
        )
    )
    print(table)
    print("docs/results.md is regenerated from the saved JSON by `spare-tl docs`")
    return 0
