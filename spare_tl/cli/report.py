"""``spare-tl report``: write the HTML report of :mod:`spare_tl.viz` for a model's cache.

Registered in :data:`spare_tl.cli.REGISTRARS`; the report's modules (plotly, the stages) load
only when the command runs, so ``spare-tl --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]

from spare_tl.embedded import EMBEDDED_MODEL as DEFAULT_MODEL


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``spare-tl report``."""
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page with the figures and results",
        description=(
            "Draw the layer-wise mutual information, MI against expectation, the behaviour "
            "table, the steering results, the baselines and the conflict probes on one HTML "
            "page that opens offline. Parts not "
            f"given default to cache_data/<model>/ (model: {DEFAULT_MODEL}); missing ones "
            "are listed on the page."
        ),
    )
    p.add_argument("--features", type=Path, help="functional-feature folder")
    p.add_argument("--statistics", type=Path, help="mutual_information folder (layer*/...)")
    p.add_argument("--results", type=Path, nargs="+", help="results JSON files or folders")
    p.add_argument("--grouped", type=Path, help="behaviours folder (the grouped prompts)")
    p.add_argument(
        "--baselines", type=Path, metavar="DIR", help="baselines folder (table.json, <method>.json)"
    )
    p.add_argument(
        "--probes",
        type=Path,
        metavar="DIR",
        help="probes folder (resid/, sae/, latents.json, conditional/)",
    )
    p.add_argument("--scan", type=Path, metavar="DIR", help="steerability scan folder (scan.json)")
    p.add_argument("--original", type=Path, help="a model folder of the paper's cache")
    p.add_argument("--original-layer", type=int, help="layer of the paper's cache to inspect")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose cache_data/ to use")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--output", type=Path, required=True, help="the HTML file to write")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from spare_tl.viz.report_inputs import load_report_inputs
    from spare_tl.viz.report_page import build_report

    inputs = load_report_inputs(
        features=args.features,
        statistics=args.statistics,
        results=args.results,
        grouped=args.grouped,
        baselines=args.baselines,
        probes=args.probes,
        original=args.original,
        scan=args.scan,
        model=args.model,
    )
    text = build_report(
        **inputs.kwargs(),
        original_layer=args.original_layer,
        title=args.title or f"SpARE report: {args.model}",
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    for note in inputs.missing:
        print(f"missing: {note}")
    print(f"wrote {args.output} ({len(text) / 1e6:.1f} MB)")
    return 0
