"""How long the feature-examples stage takes over the committed SAEs (and it writes them).

    python benchmarks/bench_feature_examples.py [--n-text 2000]

Runs :func:`spare_tl.stages.feature_examples.feature_examples` for the embedded model: every
committed SAE (13 residual layers), every committed grouped prompt and ``--n-text`` general
passages in the SAEs' training format, keeping examples for the committed functional
features (both directions). The stage is written to the embedded model's committed
``cache_data/smollm2-135m-instruct/feature_examples/`` (delete it first to time a fresh run);
the time and machine go to ``cache_data/smollm2-135m-instruct/benchmarks/feature_examples.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time

import torch

from spare_tl import cache
from spare_tl.embedded import DEFAULT_SAES, EMBEDDED_DIR, load_steering_setup
from spare_tl.hardware import cpu_info, describe
from spare_tl.saes import load_saes_for_hooks
from spare_tl.stages.behaviours import GroupedPrompts
from spare_tl.stages.feature_examples import (
    STAGE,
    FeatureExamplesConfig,
    feature_examples,
    functional_latents,
    sae_training_items,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-text", type=int, default=2000)
    parser.add_argument("--n-grouped", type=int, default=128, help="grouped prompts (sample)")
    parser.add_argument("--text-tokens", type=int, default=16, help="tokens per passage")
    parser.add_argument("--fresh", action="store_true", help="delete the saved stage first")
    args = parser.parse_args()
    print(describe())
    model, features, _ = load_steering_setup()
    hooks = sorted(
        (p.name for p in DEFAULT_SAES.iterdir() if p.is_dir()), key=lambda h: int(h.split(".")[1])
    )
    saes = load_saes_for_hooks(model, DEFAULT_SAES, hooks)
    grouped = GroupedPrompts.load(EMBEDDED_DIR / "behaviours").records
    directory = EMBEDDED_DIR / STAGE
    if args.fresh:
        shutil.rmtree(directory, ignore_errors=True)
    config = FeatureExamplesConfig(
        n_text=args.n_text, n_grouped=args.n_grouped, text_tokens=args.text_tokens
    )
    start = time.perf_counter()
    result = feature_examples(
        model,
        saes,
        grouped,
        sae_training_items(),
        latents=functional_latents(features),
        config=config,
        directory=directory,
    )
    seconds = time.perf_counter() - start
    n_tokens = {
        s: sum(e.n_tokens.get(s, 0) for e in result.by_hook.values()) // len(hooks)
        for s in ("grouped", "text")
    }
    size = sum(p.stat().st_size for p in directory.iterdir())
    out = {
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
        "saes": len(hooks),
        "grouped_prompts": min(len(grouped), args.n_grouped),
        "text_passages": args.n_text,
        "config": dataclasses.asdict(config),
        "load_average_1min_at_end": os.getloadavg()[0],
        "tokens": n_tokens,
        "latents_kept": sum(len(v) for v in functional_latents(features).values()),
        "seconds": seconds,
        "stage_bytes": size,
    }
    cache.write_json(EMBEDDED_DIR / "benchmarks" / "feature_examples.json", out)
    print(
        f"{len(hooks)} SAEs, {min(len(grouped), args.n_grouped)} grouped prompts + {args.n_text} passages "
        f"({n_tokens} tokens): {seconds:.1f} s; stage {size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
