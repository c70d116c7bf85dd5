"""Generation benchmark: steered vs unsteered cost and batch-16 vs batch-1 throughput.

    python benchmarks/bench_generation.py [--model smollm2-135m-instruct] [--prompts 32]
        [--new-tokens 12 32]

Uses the pipeline's own batched greedy loop (left padding, KV cache) on real conflict
prompts of the built-in dataset. Without committed features/SAEs (or with ``--random-saes``)
it steers with random SAEs of the real shape, which costs the same. Prints ratios; writes
JSON with ``--json``. ``--new-tokens`` takes several lengths: the pipeline generates short
answers (12 tokens), where the compute-bound prompt pass (~140 tokens per prompt) weighs most;
longer generations show the decode-bound regime.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import nullcontext

import torch

from spare_tl.embedded import EMBEDDED_MODEL


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _prompt_pass_seconds(model, prompts: list[str], batch: int) -> float:
    """Seconds for the prompt passes alone (left-padded, KV cache filled) of ``prompts``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from spare_tl.generation import _tokenize, left_pad

    token_lists = _tokenize(model, prompts)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        tokens, mask = left_pad(model, token_lists[i : i + batch])
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(tokens))
        model(tokens, attention_mask=mask, past_kv_cache=kv, stop_at_layer=model.cfg.n_layers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[12])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--random-saes", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from spare_tl.data.datasets import load_dataset
    from spare_tl.data.prompts import conflict_prompt, sample_demonstrations
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
    from spare_tl.features import FunctionalFeatures, LayerFeatures
    from spare_tl.generation import greedy_generate
    from spare_tl.methods.spare import steer
    from spare_tl.models import load_model
    from spare_tl.testing import tiny_sae

    if not args.random_saes and (DEFAULT_FEATURES / "features.json").exists():
        model, features, saes = load_steering_setup(DEFAULT_FEATURES, DEFAULT_SAES)
    else:
        model = load_model(args.model)
        layers = range(10, 16)
        d, width = model.cfg.d_model, 4 * model.cfg.d_model
        saes = {
            layer: tiny_sae(
                f"blocks.{layer}.hook_resid_post",
                d_in=d,
                d_sae=width,
                k=32,
                model_name=model.cfg.model_name,
            )
            for layer in layers
        }
        gen = torch.Generator().manual_seed(0)
        features = FunctionalFeatures(
            model_name=model.cfg.model_name,
            layers={
                layer: LayerFeatures(
                    layer,
                    f"blocks.{layer}.hook_resid_post",
                    torch.randperm(width, generator=gen)[:40],
                    torch.randperm(width, generator=gen)[:40],
                    torch.rand(width, generator=gen),
                    torch.rand(width, generator=gen),
                )
                for layer in layers
            },
            proportion=0.05,
            edit_strength=2.0,
        )
    items = load_dataset("builtin")[: args.prompts + 3]
    pool = items[args.prompts :]
    prompts = [
        conflict_prompt(it, sample_demonstrations(pool, 3, i, it), "doo")
        for i, it in enumerate(items[: args.prompts])
    ]

    def run(batch: int, steered: bool, new_tokens: int):
        def go():
            ctx = steer(model, features, "memory", saes) if steered else nullcontext()
            with ctx:
                greedy_generate(
                    model,
                    prompts,
                    batch_size=batch,
                    max_new_tokens=new_tokens,
                    stop_at_newline=False,
                    progress=False,
                )

        return _time(go, args.repeats)

    greedy_generate(model, prompts[:2], progress=False)  # warm up
    report: dict[str, dict] = {}
    print(f"{args.prompts} prompts, torch threads {torch.get_num_threads()}")
    prompt_pass = {b: _prompt_pass_seconds(model, prompts[:16], b) for b in (1, 16)}
    print(
        f"prompt pass alone, 16 prompts: batch 1 {prompt_pass[1]:.2f} s, batch 16 "
        f"{prompt_pass[16]:.2f} s ({prompt_pass[1] / prompt_pass[16]:.2f}x): the prompt "
        "pass is compute-bound, so batching saves only per-step overhead"
    )
    report["prompt_pass_16_prompts"] = {str(b): v for b, v in prompt_pass.items()}
    for n in args.new_tokens:
        t = {(b, s): run(b, s, n) for b in (1, 16) for s in (False, True)}
        rows = {
            "steered / unsteered, batch 1": t[(1, True)] / t[(1, False)],
            "steered / unsteered, batch 16": t[(16, True)] / t[(16, False)],
            "throughput batch 16 / batch 1 (unsteered)": t[(1, False)] / t[(16, False)],
            "throughput batch 16 / batch 1 (steered)": t[(1, True)] / t[(16, True)],
        }
        print(f"{n} new tokens per prompt")
        for (b, s), v in t.items():
            print(
                f"  batch {b:2d} {'steered  ' if s else 'unsteered'} {v:7.2f} s  "
                f"({args.prompts * n / v:6.1f} new tokens/s)"
            )
        for k, v in rows.items():
            print(f"  {k:45s} {v:5.2f}")
        report[str(n)] = {
            "times": {f"b{b}-{'steered' if s else 'plain'}": v for (b, s), v in t.items()},
            "ratios": rows,
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak memory {peak:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompts": args.prompts, "new_tokens": report, "peak_mb": peak}, f, indent=2)


if __name__ == "__main__":
    main()
