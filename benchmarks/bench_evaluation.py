"""Evaluation-harness benchmark: shared prompt prefix, all conditions, and bf16 against fp32.

    python benchmarks/bench_evaluation.py [--items 48] [--seeds 0] [--json out.json]
        [--parity-items 0] [--batch-size 16]

On held-out conflicts of the embedded model with the committed features and SAEs, one run:

1. **conditions**: wall time of the three conditions (no steering, SpARE to context, to
   memory) through the one harness with the shared prompt prefix, against no steering
   alone through the same harness (target <= 1.4), and against the three conditions with a
   full prompt pass each (the pre-harness path), with a check that every answer is equal;
2. **precision**: prompt-pass throughput (tokens / s) in bf16 against fp32 on the same
   prompts, and the CPU's bf16 flags (the ratio means something only with AMX /
   AVX-512 BF16);
3. with ``--parity-items N``: greedy answers in bf16 against fp32 on N held-out prompts in
   all three conditions (agreement %, EM_C / EM_M differences).

Prints ratios and the CPU; writes JSON with ``--json``. Timings depend on what else runs on
the machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _evaluate(model, features, saes, items, pool, seeds, batch_size, shared, conditions=None):
    from spare_tl.stages.evaluation import CONDITIONS, EvaluationConfig, evaluate

    config = EvaluationConfig(
        seeds=tuple(seeds), batch_size=batch_size, conditions=conditions or CONDITIONS
    )
    start = time.perf_counter()
    result = evaluate(
        model,
        items,
        pool,
        features=features if conditions != ("no_steering",) else None,
        saes=saes if conditions != ("no_steering",) else None,
        config=config,
        shared_prefix=shared,
        progress=False,
    )
    return result, time.perf_counter() - start


def _answers(result) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k.endswith(".prediction")} for r in result.predictions]


def _prompt_throughput(model, prompts: list[str], batch_size: int) -> float:
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from spare_tl.generation import _tokenize, left_pad

    token_lists = _tokenize(model, prompts)
    n_tokens = sum(len(t) for t in token_lists)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            tokens, mask = left_pad(model, token_lists[i : i + batch_size])
            kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(tokens))
            model(tokens, attention_mask=mask, past_kv_cache=kv, stop_at_layer=model.cfg.n_layers)
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--throughput-prompts", type=int, default=32)
    parser.add_argument("--parity-items", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from spare_tl.data.prompts import conflict_prompt
    from spare_tl.embedded import load_steering_setup
    from spare_tl.hardware import cpu_info, describe
    from spare_tl.models import load_model
    from spare_tl.stages.evaluation import evaluation_demonstrations
    from spare_tl.stages.memorised import memorised_split

    print(describe())
    out: dict = {
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
    }
    model, features, saes = load_steering_setup()
    split = memorised_split(model, features, "builtin", progress=False)
    items = split.test[: args.items]
    common = (model, features, saes, items, split.pool, args.seeds, args.batch_size)
    _evaluate(*common[:3], items[:4], split.pool, [0], args.batch_size, True)  # warm-up
    alone, t_alone = _evaluate(*common, True, ("no_steering",))
    shared, t_shared = _evaluate(*common, True)
    full, t_full = _evaluate(*common, False)
    same = _answers(shared) == _answers(full)
    n = len(items) * len(args.seeds)
    out["conditions"] = {
        "items": len(items),
        "seeds": args.seeds,
        "seconds_no_steering_only": t_alone,
        "seconds_three_conditions_shared": t_shared,
        "seconds_three_conditions_full_passes": t_full,
        "ratio_three_conditions_to_no_steering": t_shared / t_alone,
        "ratio_full_passes_to_no_steering": t_full / t_alone,
        "speedup_shared_over_full_passes": t_full / t_shared,
        "answers_identical": same,
        "seconds_per_item_three_conditions": t_shared / n,
    }
    print(
        f"{len(items)} items x {len(args.seeds)} seeds: no steering alone {t_alone:.1f} s; "
        f"3 conditions shared prefix {t_shared:.1f} s (x{t_shared / t_alone:.2f}), full "
        f"passes {t_full:.1f} s (x{t_full / t_alone:.2f}); shared is {t_full / t_shared:.2f}x "
        f"faster; answers identical: {same}"
    )

    if not args.skip_bf16:
        demos = evaluation_demonstrations(items, split.pool, 3, 0)
        prompts = [conflict_prompt(it, d, "doo") for it, d in zip(items, demos)]
        prompts = prompts[: args.throughput_prompts]
        fp32 = _prompt_throughput(model, prompts, args.batch_size)
        bf16_model = load_model(model.cfg.model_name, dtype=torch.bfloat16)
        _prompt_throughput(bf16_model, prompts[:2], args.batch_size)  # warm-up
        bf16 = _prompt_throughput(bf16_model, prompts, args.batch_size)
        out["precision"] = {"fp32_tokens_per_s": fp32, "bf16_tokens_per_s": bf16}
        print(f"prompt pass: fp32 {fp32:.0f} tok/s, bf16 {bf16:.0f} tok/s (x{bf16 / fp32:.2f})")
        if args.parity_items:
            par_items = split.test[: args.parity_items]
            ref, _ = _evaluate(model, features, saes, par_items, split.pool, [0], 16, True)
            low, _ = _evaluate(bf16_model, features, saes, par_items, split.pool, [0], 16, True)
            a, b = _answers(ref), _answers(low)
            pairs = [(x[k], y[k]) for x, y in zip(a, b) for k in x]
            agree = 100.0 * sum(x == y for x, y in pairs) / len(pairs)
            rj, lj = ref.to_json(), low.to_json()
            diffs = {
                c: {m: lj[c][m] - rj[c][m] for m in ("EM_C", "EM_M")}
                for c in ("no_steering", "steer_to_context", "steer_to_memory")
            }
            met = agree >= 98.0 and all(abs(v) <= 1.5 for d in diffs.values() for v in d.values())
            out["parity"] = {
                "prompts": len(par_items),
                "answers": len(pairs),
                "agreement": agree,
                "differences": diffs,
                "target": "agreement >= 98 % and |EM_C|, |EM_M| differences <= 1.5 points",
                "target_met": met,
            }
            print(
                f"bf16 vs fp32 on {len(pairs)} answers: {agree:.1f} % agree; {diffs}; "
                f"target (>= 98 %, EM within 1.5 points) {'met' if met else 'NOT met'}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
