"""``spare-tl import-original``: the SpARE paper's cached features as a spare-tl feature set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spare_tl.checks import finite_non_negative
from spare_tl.checks import output_dir as check_output_dir
from spare_tl.studies.original import DEFAULT_HOOK_TEMPLATE, import_original


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``spare-tl import-original``."""
    p = sub.add_parser(
        "import-original",
        help="import the SpARE paper's cached features (cache_data/<model>)",
        description=(
            "Select functional features from the original SpARE cache (mutual information, "
            "expectation, func_weights) and write them as a spare-tl feature set."
        ),
    )
    p.add_argument("model_dir", type=Path, help="e.g. .../spare-original-cache/Meta-Llama-3-8B")
    p.add_argument("--layers", type=int, nargs="+", required=True, help="layers to import")
    p.add_argument("--proportion", type=float, required=True, help="K, e.g. 0.07")
    p.add_argument("--edit-strength", type=float, default=1.0, help="α (default 1.0)")
    p.add_argument(
        "--edit-strength-to-memory", type=float, default=None, help="α when steering to memory"
    )
    p.add_argument("--hook-template", default=DEFAULT_HOOK_TEMPLATE, help="hook name with {layer}")
    p.add_argument("--output", type=Path, required=True, help="folder for the feature set")
    p.add_argument("--json", action="store_true", help="print per-layer counts as JSON")
    p.set_defaults(func=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    finite_non_negative(args.edit_strength, "--edit-strength α")
    if args.edit_strength_to_memory is not None:
        finite_non_negative(args.edit_strength_to_memory, "--edit-strength-to-memory α")
    check_output_dir(args.output)
    features = import_original(
        args.model_dir,
        layers=args.layers,
        proportion=args.proportion,
        edit_strength=args.edit_strength,
        edit_strength_to_memory=args.edit_strength_to_memory,
        hook_template=args.hook_template,
    )
    features.save(args.output)
    counts = features.counts()
    if args.json:
        json.dump(
            {
                "model_name": features.model_name,
                "proportion": features.proportion,
                "output": str(args.output),
                "layers": {str(k): {"context": c, "memory": m} for k, (c, m) in counts.items()},
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        for layer, (c, m) in counts.items():
            print(f"layer {layer}: {c} context, {m} memory features")
        print(f"wrote {args.output}")
    return 0
