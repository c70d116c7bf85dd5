"""CAD against no steering on the embedded model: seconds per item and their ratio.

    python benchmarks/bench_cad.py [--items 64] [--alpha 1.0] [--json PATH]

Both run on the same test questions with one demonstration set (seed 0, the paper's
protocol), batch 16, greedy, 12 new tokens. No steering is the harness's shared-prefix
generation (demonstrations run once, each batch's own tokens, decoding with rows dropped as
they finish); CAD is :func:`spare_tl.methods.baselines.cad_generate`. The time of each is
split into the prompt passes and the decoding. The issue's target is CAD <= 1.3 x no
steering on 2 CPU cores. ``flop_ratio`` is the forward tokens CAD computes over no
steering's (the context-free version's own tokens and a second row per answer token): the
least the ratio can be when both run at the same FLOP rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
from spare_tl.generation import Decoding, generate_shared_prefix
from spare_tl.hardware import describe
from spare_tl.methods.baselines import cad_generate, prompt_without_context
from spare_tl.stages.evaluation import evaluation_questions
from spare_tl.stages.memorised import memorised_split

sys.path.insert(0, str(Path(__file__).parent))
from bench_study import answer_tokens, prompt_tokens  # noqa: E402


def flop_ratio(model, prompts, closed, answers: dict[str, list[str]]) -> dict:
    """The forward tokens each computes (every token costs the same matrix FLOPs): no
    steering runs the demonstration prefix once, each prompt's own tokens, and its answers;
    CAD the prefix once, both versions' own tokens, and each answer token in both versions.
    Their ratio is the least CAD can cost against no steering when both run at the same FLOP
    rate."""
    with_context = prompt_tokens(model, prompts, True)
    both = prompt_tokens(model, [*prompts, *closed], True)
    none = with_context + answer_tokens(model, answers["none"])
    cad = both + 2 * answer_tokens(model, answers["cad"])
    return {
        "tokens": {
            "no_steering_prompt": with_context,
            "cad_prompt": both,
            "no_steering_decode": none - with_context,
            "cad_decode": cad - both,
        },
        "flop_ratio": round(cad / none, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, features, _ = load_steering_setup(DEFAULT_FEATURES, DEFAULT_SAES, dtype="float32")
    split = memorised_split(model, features, "builtin", progress=False)
    questions = evaluation_questions(split.test[: args.items], split.pool, 3, 0)
    prompts = questions.prompts()
    closed = [
        prompt_without_context(it, d, questions.demo_type)
        for it, d in zip(questions.items, questions.demonstrations)
    ]
    decoding = Decoding(max_new_tokens=12, batch_size=16, progress=False)

    answers: dict[str, list[str]] = {}

    def none() -> dict[str, float]:
        seconds: dict[str, float] = {}
        answers["none"] = generate_shared_prefix(
            model, prompts, {"none": None}, seconds=seconds, decoding=decoding
        )["none"]
        return seconds

    def cad() -> dict[str, float]:
        seconds: dict[str, float] = {}
        answers["cad"] = cad_generate(
            model, prompts, closed, args.alpha, decoding=decoding, seconds=seconds
        )
        return seconds

    def best(fn) -> tuple[float, dict[str, float]]:
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            parts = fn()
            runs.append((time.perf_counter() - start, parts))
        return min(runs, key=lambda r: r[0])

    none()  # warm-up
    t_none, parts_none = best(none)
    t_cad, parts_cad = best(cad)
    n = len(prompts)
    out = {
        "machine": describe(),
        "date": dt.date.today().isoformat(),
        "command": f"python benchmarks/bench_cad.py --items {args.items} --alpha {args.alpha}",
        "items": n,
        "no_steering_seconds_per_item": round(t_none / n, 4),
        "cad_seconds_per_item": round(t_cad / n, 4),
        "no_steering_parts": {k: round(v, 2) for k, v in parts_none.items()},
        "cad_parts": {k: round(v, 2) for k, v in parts_cad.items()},
        "cad_ratio": round(t_cad / t_none, 2),
        "target_ratio": 1.3,
        **flop_ratio(model, prompts, closed, answers),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
