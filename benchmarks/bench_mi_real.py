"""Mutual information on real activations: our estimator against scikit-learn's, per layer.

The embedded model's cached last-position residuals of the grouped prompts (stage
``activations``; computed if missing) are encoded by the committed SAEs, and each layer's
codes go through

- ``sklearn``: ``mutual_info_classif`` (the reference, ``random_state=0``),
- ``ours (sklearn noise)``: ``mutual_information(..., noise="sklearn", skip_inactive=False)``,
  the same estimator with scikit-learn's tie-breaking noise stream,
- ``ours (default)``: the pipeline's default (independent seeded noise, dead latents = 0),
- ``sklearn seed 1``: scikit-learn against itself with another noise seed (the floor that any
  other noise stream can reach on tie-dominated sparse codes).

Prints Spearman over latents, the overlap of the top 100 and the time of each estimator.

    python benchmarks/bench_mi_real.py [--layers 10-17] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from bench_mutual_info import spearman, top_overlap  # same directory


def _layers(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def _timed(fn, *args, **kwargs) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs).numpy()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", default="10-17")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--latent-code",
        default="encode",
        choices=["encode", "relu_pre"],
        help="SAE code: post-top-k 'encode' or the denser pre-top-k 'relu_pre'",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from spare_tl.embedded import DEFAULT_SAES, EMBEDDED_DIR, EMBEDDED_MODEL
    from spare_tl.models import load_model
    from spare_tl.mutual_info import mutual_information, mutual_information_reference
    from spare_tl.saes import encode_latents, load_saes_for_layers
    from spare_tl.stages.activations import collect_activations
    from spare_tl.stages.behaviours import GroupedPrompts

    layers = _layers(args.layers)
    model = load_model(EMBEDDED_MODEL)
    grouped = GroupedPrompts.load(EMBEDDED_DIR / "behaviours")
    acts = collect_activations(model, grouped, list(range(10, 18)))
    saes = load_saes_for_layers(model, DEFAULT_SAES, layers)

    rows = []
    header = (
        f"{'layer':>5} {'active':>11} {'sklearn s':>9} {'ours s':>7} {'×':>6} "
        f"{'ρ sk-noise':>10} {'top':>5} {'ours-def s':>10} {'ρ default':>9} {'top':>5} "
        f"{'ρ sk seed1':>10} {'top':>5}"
    )
    print(
        f"{len(acts.labels)} prompts ({int(acts.labels.sum())} context / "
        f"{int((acts.labels == 0).sum())} memory), torch threads {torch.get_num_threads()}"
    )
    print(header)
    for layer in layers:
        codes = encode_latents(saes[layer], acts.resid[layer], args.latent_code).float()
        y = acts.labels
        n_active = int((codes.amax(0) != codes.amin(0)).sum())

        ref, t_ref = _timed(mutual_information_reference, codes, y, seed=0)
        exact, t_exact = _timed(
            mutual_information, codes, y, seed=0, noise="sklearn", skip_inactive=False
        )
        default, t_default = _timed(mutual_information, codes, y, seed=0)
        floor, _ = _timed(mutual_information_reference, codes, y, seed=1)
        row = {
            "layer": layer,
            "latents": codes.shape[1],
            "active": n_active,
            "sklearn_s": t_ref,
            "ours_sklearn_noise_s": t_exact,
            "speedup_sklearn_noise": t_ref / t_exact,
            "spearman_sklearn_noise": spearman(exact, ref),
            "top_sklearn_noise": top_overlap(exact, ref, args.top),
            "max_abs_diff_sklearn_noise": float(np.abs(exact - ref).max()),
            "ours_default_s": t_default,
            "speedup_default": t_ref / t_default,
            "spearman_default": spearman(default, ref),
            "top_default": top_overlap(default, ref, args.top),
            "spearman_sklearn_seed1": spearman(floor, ref),
            "top_sklearn_seed1": top_overlap(floor, ref, args.top),
        }
        rows.append(row)
        print(
            f"{layer:>5} {n_active:>5}/{codes.shape[1]:<5} {t_ref:>9.2f} {t_exact:>7.2f} "
            f"{row['speedup_sklearn_noise']:>5.1f}× {row['spearman_sklearn_noise']:>10.4f} "
            f"{row['top_sklearn_noise']:>5.0%} {t_default:>10.2f} {row['spearman_default']:>9.4f} "
            f"{row['top_default']:>5.0%} {row['spearman_sklearn_seed1']:>10.4f} "
            f"{row['top_sklearn_seed1']:>5.0%}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
