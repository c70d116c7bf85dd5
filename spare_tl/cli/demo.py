"""``spare-tl demo`` (``make demo``): SpARE on the embedded SmolLM2-135M-Instruct, offline, on the CPU.

With the committed SAEs and functional features it shows, for a handful of held-out
knowledge conflicts, the unsteered answer and the answers steered to context and to memory,
then exact match on a small held-out slice. Without them (a checkout before the features
were committed) it shows the conflict itself: the closed-book answer vs the answer with a
conflicting context.
"""

from __future__ import annotations

import argparse
import time

import torch

from spare_tl.cli.args import add_dtype_argument
from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, EMBEDDED_MODEL
from spare_tl.hardware import resolve_dtype


def _conflict_showcase(model, items, n: int) -> None:
    from spare_tl.data.prompts import closed_book_prompt, conflict_prompt
    from spare_tl.generation import greedy_generate

    shown = items[:n]
    closed = greedy_generate(model, [closed_book_prompt(it) for it in shown], progress=False)
    ctx = greedy_generate(model, [conflict_prompt(it) for it in shown], progress=False)
    print(f"{'question':45s} | {'closed book':18s} | {'with conflicting context':24s}")
    for it, a, b in zip(shown, closed, ctx):
        print(
            f"{it.question[:45]:45s} | {a[:18]:18s} | {b[:24]:24s} (context says {it.sub_answer[0]})"
        )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``spare-tl demo`` (what ``make demo`` runs)."""
    p = sub.add_parser(
        "demo",
        help="SpARE on the embedded model: steered answers both ways and exact match (CPU)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--examples", type=int, default=6)
    p.add_argument("--eval-items", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--report", default="out/report.html", help="HTML report ('' to skip)")
    add_dtype_argument(p)
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args`` (examples, eval_items, seeds, report)."""
    torch.set_grad_enabled(False)
    start = time.time()

    from spare_tl import checks
    from spare_tl.data.datasets import load_dataset
    from spare_tl.models import load_model

    if args.report:
        checks.output_file(args.report, "--report")
    checks.at_least(args.examples, 1, "--examples")
    checks.at_least(args.eval_items, 1, "--eval-items")
    print(f"Loading the embedded model ({EMBEDDED_MODEL}) ...", flush=True)
    model = load_model(EMBEDDED_MODEL, dtype=resolve_dtype(args.dtype))
    items = load_dataset("builtin")
    have_features = (DEFAULT_FEATURES / "features.json").exists() and DEFAULT_SAES.exists()
    if not have_features:
        print("No committed functional features yet: showing the knowledge conflict itself.\n")
        _conflict_showcase(model, items[:: max(1, len(items) // args.examples)], args.examples)
        print(f"\ndone in {time.time() - start:.0f} s")
        return 0

    from spare_tl.cli.commands import _format_summary
    from spare_tl.data.prompts import Questions, sample_demonstrations
    from spare_tl.embedded import load_steering_setup
    from spare_tl.stages.evaluation import EvaluationConfig, evaluate
    from spare_tl.stages.harness import Condition, NoSteering, SpareMethod, answer_conditions
    from spare_tl.stages.memorised import memorised_split

    model, features, saes = load_steering_setup(str(DEFAULT_FEATURES), str(DEFAULT_SAES), model)
    for direction in ("context", "memory"):
        print(f"Steering to {direction}: {features.describe(direction)}")
    print()
    split = memorised_split(model, features, "builtin", progress=False)
    held_out = split.test
    examples = held_out[:: max(1, len(held_out) // args.examples)][: args.examples]
    demonstrations = [
        sample_demonstrations(split.pool, 3, seed=i, exclude=it) for i, it in enumerate(examples)
    ]
    # the three ways from one shared prompt pass (spare_tl.stages.harness)
    spare = SpareMethod(features, saes)
    answers = answer_conditions(
        model,
        Questions(examples, demonstrations),
        [
            Condition("none", NoSteering()),
            Condition("context", spare, "context"),
            Condition("memory", spare, "memory"),
        ],
        progress=False,
    )
    print(
        f"{'question':40s} | {'C (context)':14s} | {'M (memory)':14s} | {'no steering':14s} | {'to context':14s} | {'to memory':14s}"
    )
    for i, it in enumerate(examples):
        print(
            f"{it.question[:40]:40s} | {it.sub_answer[0][:14]:14s} | {it.org_answer[0][:14]:14s} | "
            f"{answers['none'][i][:14]:14s} | {answers['context'][i][:14]:14s} | {answers['memory'][i][:14]:14s}"
        )
    print(f"\nExact match on {args.eval_items} held-out conflicts (3 doo demonstrations):")
    result = evaluate(
        model,
        held_out[: args.eval_items],
        split.pool,
        features=features,
        saes=saes,
        config=EvaluationConfig(seeds=tuple(args.seeds)),
        progress=False,
    )
    print(_format_summary(result.to_json()))
    if args.report:
        from pathlib import Path

        from spare_tl.cache import write_text_atomic
        from spare_tl.viz.report_inputs import load_report_inputs
        from spare_tl.viz.report_page import build_report

        inputs = load_report_inputs(model=model.cfg.model_name)
        out = Path(args.report)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            out, build_report(**inputs.kwargs(), title="SpARE on SmolLM2-135M-Instruct")
        )
        print(f"\nReport with figures: {out}")
    print(f"\ndone in {time.time() - start:.0f} s")
    return 0
