"""How steady the mutual-information ranking is under each SAE latent code.

The embedded model's cached last-position residuals of the grouped prompts are encoded by
the committed SAEs with the post-top-k code (``encode``) and the pre-top-k ReLU code
(``relu_pre``); for each, our estimator runs with noise seed 0 and seed 1. Prints per layer
the latents that vary over the prompts, the Spearman correlation of the two rankings over
those latents, the overlap of the two top-50s, and how many features K = 0.05 selects.

    python benchmarks/bench_mi_codes.py [--layers 10-17] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_mi_real import _layers  # same directory
from bench_mutual_info import spearman, top_overlap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", default="10-17")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--proportion", type=float, default=0.05)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from spare_tl.embedded import DEFAULT_SAES, EMBEDDED_DIR
    from spare_tl.features import select_functional_features
    from spare_tl.mutual_info import expectation_difference, mutual_information
    from spare_tl.saes import encode_latents, load_sae
    from spare_tl.stages.activations import Activations

    acts = Activations.load(EMBEDDED_DIR / "activations")
    print(f"{len(acts.labels)} grouped prompts, noise seed 0 vs seed 1")
    print(
        f"{'layer':>5} {'code':>9} {'varying':>8} {'Spearman':>9} {'top-' + str(args.top):>7} {'K feats':>8}"
    )
    rows = []
    for layer in _layers(args.layers):
        sae = load_sae(DEFAULT_SAES / f"blocks.{layer}.hook_resid_post")
        for code in ("encode", "relu_pre"):
            z = encode_latents(sae, acts.resid[layer].float(), code).float()
            first = mutual_information(z, acts.labels, seed=0)
            second = mutual_information(z, acts.labels, seed=1)
            varying = (z.amax(0) != z.amin(0)).numpy()
            rho = spearman(first.numpy()[varying], second.numpy()[varying])
            overlap = top_overlap(first.numpy(), second.numpy(), args.top)
            ctx, mem = select_functional_features(
                first, expectation_difference(z, acts.labels), args.proportion
            )
            row = {
                "layer": layer,
                "code": code,
                "varying": int(varying.sum()),
                "spearman": rho,
                "top_overlap": overlap,
                "features": int(len(ctx) + len(mem)),
            }
            rows.append(row)
            print(
                f"{layer:>5} {code:>9} {row['varying']:>8} {rho:>9.3f} {overlap:>7.0%} "
                f"{row['features']:>8}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
