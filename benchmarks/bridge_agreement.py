"""The TransformerBridge backend against the hooked one on the embedded model.

    python benchmarks/bridge_agreement.py [--items 48] [--seed 0] [--json out.json]

1. **logits**: max |Δ log-prob| over every real position and the whole vocabulary of a few
   prompts (held-out conflict prompts and plain text), left-padded in one batch, and the
   share of positions whose argmax agrees;
2. **answers**: SpARE's evaluation (no steering, steered to context, steered to memory;
   the committed features and SAEs; ``doo`` demonstrations of one seed) on ``--items``
   held-out prompts through each backend: the share of identical predictions per condition
   and EM_C / EM_M per condition for both.

Prints both and writes JSON with ``--json``; timings are the wall time of each evaluation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _logit_agreement(hooked, bridge, prompts: list[str]) -> dict:
    from spare_tl.generation import _tokenize, left_pad

    tokens, mask = left_pad(hooked, _tokenize(hooked, prompts))
    real = mask.bool()
    lp = {}
    for label, model in (("hooked", hooked), ("bridge", bridge)):
        logits = model(tokens, attention_mask=mask, padding_side="left")
        lp[label] = logits.float().log_softmax(-1)[real]
    diff = (lp["hooked"] - lp["bridge"]).abs()
    return {
        "prompts": len(prompts),
        "positions": int(real.sum()),
        "max_abs_delta_logprob": float(diff.max()),
        "argmax_agreement": float(
            (lp["hooked"].argmax(-1) == lp["bridge"].argmax(-1)).float().mean()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from spare_tl.data.prompts import conflict_prompt
    from spare_tl.embedded import load_steering_setup
    from spare_tl.hardware import describe
    from spare_tl.stages.evaluation import EvaluationConfig, evaluate, evaluation_demonstrations
    from spare_tl.stages.memorised import memorised_split

    print(describe())
    hooked, features, saes = load_steering_setup()
    bridge, _, bridge_saes = load_steering_setup(backend="bridge")
    split = memorised_split(hooked, features, "builtin", progress=False)
    items = split.test[: args.items]
    demos = evaluation_demonstrations(items[:4], split.pool, 3, args.seed)
    prompts = [conflict_prompt(it, d, "doo") for it, d in zip(items[:4], demos)]
    prompts += ["The capital of France is", "Once upon a time, there was a"]
    logits = _logit_agreement(hooked, bridge, prompts)
    print(
        f"logits: {logits['prompts']} prompts, {logits['positions']} positions: "
        f"max |Δ log-prob| = {logits['max_abs_delta_logprob']:.2e}, "
        f"argmax agreement {100 * logits['argmax_agreement']:.2f} %"
    )

    config = EvaluationConfig(seeds=(args.seed,))
    results, seconds = {}, {}
    for label, model, model_saes in (("hooked", hooked, saes), ("bridge", bridge, bridge_saes)):
        start = time.perf_counter()
        results[label] = evaluate(
            model,
            items,
            split.pool,
            features=features,
            saes=model_saes,
            config=config,
            progress=False,
        )
        seconds[label] = time.perf_counter() - start
    answers = {}
    for cond in config.conditions:
        pairs = [
            (h[f"{cond}.prediction"], b[f"{cond}.prediction"])
            for h, b in zip(results["hooked"].predictions, results["bridge"].predictions)
        ]
        answers[cond] = {
            "agreement": sum(h == b for h, b in pairs) / len(pairs),
            "differing": [{"hooked": h, "bridge": b} for h, b in pairs if h != b],
            **{
                f"{label}_{em}": results[label].summary[cond][em]
                for label in ("hooked", "bridge")
                for em in ("EM_C", "EM_M")
            },
        }
        a = answers[cond]
        print(
            f"{cond}: {100 * a['agreement']:.1f} % of {len(items)} answers identical; "
            f"EM_C {a['hooked_EM_C']:.1f} / {a['bridge_EM_C']:.1f}, "
            f"EM_M {a['hooked_EM_M']:.1f} / {a['bridge_EM_M']:.1f} (hooked / bridge)"
        )
    print(
        f"evaluation wall time: hooked {seconds['hooked']:.0f} s, bridge {seconds['bridge']:.0f} s"
    )
    out = {
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/bridge_agreement.py "
        + f"--items {args.items} --seed {args.seed}",
        "logits": logits,
        "answers": {"items": len(items), "seed": args.seed, "conditions": answers},
        "seconds": seconds,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
