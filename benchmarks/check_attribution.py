"""The attribution stage on the embedded model, checked against exact one-latent patching.

    python benchmarks/check_attribution.py [--prompts 32] [--latents 50]

1. Runs the attribution stage (:mod:`spare_tl.stages.attribution`) on the committed grouped
   pool prompts for the committed feature set's layers (both directions), with the committed
   statistics' z̄_C and z̄_M (read, not recomputed), cached under
   ``cache_data/smollm2-135m-instruct/attribution/`` (reused when fresh).
2. Exact check: at a context-set layer (toward context, on use-memory prompts) and a
   memory-set layer (toward memory, on use-context prompts), ``--prompts`` pool prompts and
   ``--latents`` latents (half the latents with the largest mean estimate on the sample, half
   drawn at random from those active on the sample or with z̄ ≠ 0): the estimated change of the metric
   g (z̄ − z) beside the exact change of setting that one latent to z̄; Pearson and Spearman
   over the (prompt, latent) pairs and over the latents' means.
3. Overlap: per layer and direction, the features chosen by attribution at the committed K
   against the committed (MI) set.

Writes ``cache_data/smollm2-135m-instruct/benchmarks/attribution.json``. With
``--write-features DIR`` (and ``--selection``), also the feature set with the committed layers,
K and α per direction chosen by that selection, for ``spare-tl evaluate --features DIR``;
``--skip-exact`` leaves out step 2, ``--exact-only`` steps 1 and 3; each run updates its parts
of the JSON. ``--stage-seconds`` records the stage's wall time when an earlier run computed it
(a run that finds the stage cached only loads it). ``--seeds`` keeps only the grouped prompts
of those demonstration seeds and ``--max-prompts`` a seeded sample of that many of the kept
ones (subsets of the pool's prompts, for a machine short of time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from scipy import stats as scipy_stats

from spare_tl import cache
from spare_tl.embedded import DEFAULT_FEATURES, EMBEDDED_DIR, load_steering_setup
from spare_tl.features import select_features
from spare_tl.hardware import describe
from spare_tl.saes import site_of_hook
from spare_tl.stages.attribution import (
    SOURCE_GROUP,
    answer_first_tokens,
    attribution_scores,
    exact_patch_effects,
    grouped_answers,
    latent_attribution,
    latent_gradients,
)
from spare_tl.stages.behaviours import STAGE as GROUPED_STAGE
from spare_tl.stages.behaviours import GroupedPrompts
from spare_tl.stages.selection import directional_features
from spare_tl.stages.statistics import LayerStatistics

OUTPUT = EMBEDDED_DIR / "benchmarks" / "attribution.json"


def correlations(estimate: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    e, x = estimate.flatten().double().numpy(), exact.flatten().double().numpy()
    return {
        "pearson": float(scipy_stats.pearsonr(e, x)[0]),
        "spearman": float(scipy_stats.spearmanr(e, x)[0]),
        "n": int(e.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--latents", type=int, default=50)
    parser.add_argument("--check-layers", type=int, nargs=2, default=[12, 20],
                        metavar=("CONTEXT_LAYER", "MEMORY_LAYER"))  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--exact-only", action="store_true")
    parser.add_argument("--stage-seconds", type=float, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--write-features", default=None, metavar="DIR")
    parser.add_argument("--selection", default="attribution", choices=["attribution", "both"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, committed, saes_by_hook = load_steering_setup()
    grouped = GroupedPrompts.load(Path(DEFAULT_FEATURES).parent / GROUPED_STAGE)
    if args.seeds is not None:
        kept = [r for r in grouped.records if r["seed"] in args.seeds]
        grouped = GroupedPrompts(grouped.model_name, kept, grouped.config)
    if args.max_prompts is not None:
        kept = [r for r in grouped.records if r["label"] in ("context", "memory")]
        pick = torch.randperm(len(kept), generator=torch.Generator().manual_seed(args.seed))
        chosen = sorted(pick[: args.max_prompts].tolist())
        grouped = GroupedPrompts(grouped.model_name, [kept[i] for i in chosen], grouped.config)
    report: dict = cache.read_json(OUTPUT) if OUTPUT.is_file() else {}
    report.update(
        title="Attribution patching against exact one-latent patching (embedded model)",
        machine=describe(),
        date=time.strftime("%Y-%m-%d"),
        command="python " + " ".join(sys.argv),
        model=model.cfg.model_name,
        dtype=str(model.cfg.dtype),
    )

    # 1. the stage, per direction's layers (one site each here)
    start = time.perf_counter()
    attribution, statistics = {}, {}
    layers = sorted(set(committed.all_layers))
    hooks = {}  # layer -> the committed LayerFeatures there (its hook)
    for direction in ("context", "memory"):
        hooks.update(committed.for_direction(direction).layers)
    site = {site_of_hook(f.hook_name) for f in hooks.values()}.pop()
    for layer in layers:
        path = EMBEDDED_DIR / "mutual_information" / f"layer{layer}" / f"layer{layer}.safetensors"
        statistics[layer] = LayerStatistics.load(path)
    saes = {layer: saes_by_hook[hooks[layer].hook_name] for layer in layers}
    if not args.exact_only:
        attribution = latent_attribution(model, grouped, statistics, saes, site=site)
        seconds = round(time.perf_counter() - start, 1)
        report["stage"] = {
            "layers": layers,
            "site": site,
            "seconds_this_run": seconds,
            "seconds_computed": args.stage_seconds or seconds,
            "prompts": attribution[layers[0]].counts,
            "grouped_seeds": args.seeds or "all",
            "max_prompts": args.max_prompts,
        }
        print(f"attribution stage, layers {layers}: {seconds} s")

    # 2. the exact check
    prompts, labels, memory, context = grouped_answers(grouped)
    mem_tok, ctx_tok = answer_first_tokens(model, memory), answer_first_tokens(model, context)
    valid = mem_tok != ctx_tok
    for direction, layer in zip(
        ("context", "memory"), [] if args.skip_exact else args.check_layers
    ):
        start = time.perf_counter()
        source = 0 if SOURCE_GROUP[direction] == "use_memory" else 1
        pool = torch.nonzero(valid & (labels == source)).squeeze(1)
        rows = pool[torch.randperm(len(pool))[: args.prompts]].tolist()
        sample = [prompts[i] for i in rows]
        hook = hooks[layer].hook_name
        s = statistics[layer]
        target = s.context_activations if direction == "context" else s.memory_activations
        codes, grads, _ = latent_gradients(
            model, sample, mem_tok[rows], ctx_tok[rows], {hook: saes[layer]}, batch_size=16
        )
        estimate_all = attribution_scores(codes[hook], grads[hook], target)
        half = args.latents // 2
        sign = -1 if direction == "context" else 1  # the estimate toward the direction
        top = (sign * estimate_all).mean(0).topk(half).indices
        live = torch.nonzero((codes[hook] > 0).any(0) | (target > 0)).squeeze(1)
        live = live[~torch.isin(live, top)]
        latents = torch.cat([top, live[torch.randperm(len(live))[: args.latents - half]]])
        exact = exact_patch_effects(
            model, sample, mem_tok[rows], ctx_tok[rows], saes[layer], latents, target
        )
        estimate = estimate_all[:, latents]
        report.setdefault("exact", {})[f"to_{direction}"] = {
            "layer": layer,
            "prompts": len(rows),
            "latents": len(latents),
            "pairs": correlations(estimate, exact),
            "latent_means": correlations(estimate.mean(0), exact.mean(0)),
            "top_half_means": correlations(estimate[:, :half].mean(0), exact[:, :half].mean(0)),
            "mean_abs_exact": float(exact.abs().mean()),
            "mean_abs_estimate": float(estimate.abs().mean()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"to {direction}, layer {layer}: {json.dumps(report['exact'][f'to_{direction}'])}")

    # 3. overlap with the committed (MI) sets at the committed K
    for direction in [] if args.exact_only else ("context", "memory"):
        fset = committed.for_direction(direction)
        for layer, f in sorted(fset.layers.items()):
            s = statistics[layer]
            mi_ids = set(f.context_features.tolist() + f.memory_features.tolist())
            ctx, mem = select_features(
                "attribution",
                fset.proportion,
                s.mutual_information,
                s.expectation,
                attribution[layer].toward(direction),
            )
            at_ids = set(ctx.tolist() + mem.tolist())
            row = {
                "K": fset.proportion,
                "mi": len(mi_ids),
                "attribution": len(at_ids),
                "attribution_context_memory": [len(ctx), len(mem)],
                "shared": len(mi_ids & at_ids),
                "union": len(mi_ids | at_ids),
            }
            report.setdefault("overlap", {})[f"to_{direction} layer {layer}"] = row
            print(f"to {direction}, layer {layer}: {row}")
    if args.write_features:
        settings = {}
        for direction in ("context", "memory"):
            settings[direction] = replace(
                committed.setting(direction), site=site, selection=args.selection
            )
        chosen = directional_features(
            {site: statistics},
            model_name=model.cfg.model_name,
            context=settings["context"],
            memory=settings["memory"],
            metadata={**committed.metadata, "chosen_by": "benchmarks/check_attribution.py"},
            attribution={site: attribution},
        )
        chosen.save(Path(args.write_features))
        for direction in ("context", "memory"):
            print(f"wrote {args.write_features}: to {direction} {chosen.describe(direction)}")
    cache.write_json(OUTPUT, report)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
