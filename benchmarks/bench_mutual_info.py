"""Benchmark: vectorised mutual information (spare_tl) against scikit-learn's mutual_info_classif.

Synthetic SAE-like codes: ``--samples`` prompts x ``--latents`` latents, each latent active
on a few per cent of the prompts (exponential magnitudes, exact zeros elsewhere), some dead,
and a planted signal in some (activation rate and magnitude depend on the label). Every
estimator runs in its own fresh subprocess (same data, regenerated from the seed) so that its
time and peak memory (ru_maxrss increase over the process's baseline) are measured alone.

    python benchmarks/bench_mutual_info.py                       # 2,000 x 16,384, ~minutes
    python benchmarks/bench_mutual_info.py --latents 2048 --json out.json

Rows: ``ours`` (default noise), ``ours, 1 thread``, ``ours, noise=sklearn, dead kept``
(scikit-learn's exact noise stream, dead latents estimated rather than set to 0) and ``sklearn seed 1`` on the first ``--floor-latents`` latents: how much
scikit-learn agrees with *itself* across noise seeds, the floor for any other noise stream.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_codes(
    n: int, d: int, density: float, dead: float, signal: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse non-negative codes (float32, n x d) and binary labels (int64, n)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    # per-latent activation rate: log-uniform around `density`
    rate = density * np.exp(rng.uniform(-1.0, 1.0, d))
    rate[rng.random(d) < dead] = 0.0
    scale = rng.lognormal(0.0, 0.5, d)
    planted = rng.choice(
        np.flatnonzero(rate > 0), size=min(signal, int((rate > 0).sum())), replace=False
    )
    # planted latents fire more often (5-30 %) and more in one group than the other
    rate[planted] = rng.uniform(0.05, 0.3, planted.size)
    strength = np.zeros(d)
    strength[planted] = rng.uniform(0.3, 0.9, planted.size) * rng.choice([-1.0, 1.0], planted.size)
    sign = (2 * labels - 1)[:, None]  # +1 context, -1 memory
    codes = np.zeros((n, d), dtype=np.float32)
    step = 1024
    for start in range(0, d, step):
        sl = slice(start, start + step)
        p = np.clip(rate[sl] * (1 + strength[sl] * sign), 0, 1)
        active = rng.random((n, p.shape[1])) < p
        mag = rng.exponential(1.0, active.shape) * scale[sl] * (1 + 0.5 * strength[sl] * sign)
        codes[:, sl] = np.where(active, mag, 0.0).astype(np.float32)
    return codes, labels


def worker(args: argparse.Namespace) -> None:
    """Run one estimator; print JSON {seconds, peak_mb}; save the MI vector to args.out."""
    import torch

    torch.set_num_threads(args.threads)
    from spare_tl.mutual_info import mutual_information, mutual_information_reference

    codes, labels = make_codes(
        args.samples, args.latents, args.density, args.dead, args.signal, args.seed
    )
    if args.worker == "sklearn-floor":
        codes = codes[:, : args.floor_latents]
    acts, y = torch.from_numpy(codes), torch.from_numpy(labels)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.worker == "sklearn":
        mi = mutual_information_reference(acts, y, seed=0)
    elif args.worker == "sklearn-floor":
        mi = mutual_information_reference(acts, y, seed=1)
    else:
        exact = args.worker == "ours-sklearn-noise"
        mi = mutual_information(
            acts,
            y,
            seed=0,
            noise="sklearn" if exact else "independent",
            skip_inactive=not exact,  # scikit-learn gives dead latents a noise estimate too
        )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(args.out, mi.numpy())
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - base) / 1024}))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.03, help="typical active fraction")
    parser.add_argument("--dead", type=float, default=0.05, help="fraction of dead latents")
    parser.add_argument("--signal", type=int, default=300, help="latents with a planted signal")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for ours")
    parser.add_argument("--floor-latents", type=int, default=2048)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    runs = [
        ("ours", "ours", args.threads),
        ("ours, 1 thread", "ours", 1),
        ("ours, noise=sklearn, dead kept", "ours-sklearn-noise", args.threads),
        ("sklearn (reference)", "sklearn", args.threads),
        (f"sklearn seed 1, first {args.floor_latents}", "sklearn-floor", args.threads),
    ]
    results: dict[str, dict] = {}
    mis: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, threads in runs:
            out = os.path.join(tmp, f"{kind}-{threads}.npy")
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--out",
                out,
                "--threads",
                str(threads),
            ]
            for flag in (
                "latents",
                "samples",
                "density",
                "dead",
                "signal",
                "seed",
                "floor_latents",
            ):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            mis[name] = np.load(out)

    ref = mis["sklearn (reference)"]
    floor = f"sklearn seed 1, first {args.floor_latents}"
    for name, row in results.items():
        mi = mis[name]
        r = ref[: mi.shape[0]]
        row["speedup"] = (
            results["sklearn (reference)"]["seconds"] * mi.shape[0] / ref.shape[0] / row["seconds"]
        )
        row["spearman"] = spearman(mi, r)
        row["top_overlap"] = top_overlap(mi, r, args.top)
        row["max_abs_diff"] = float(np.abs(mi - r).max())
        alive = r > 0
        row["spearman_mi_pos"] = spearman(mi[alive], r[alive])
    # the same comparisons for ours restricted to the floor's latents, for a like-for-like view
    sub = mis["ours"][: args.floor_latents]
    results["ours"]["first_latents_spearman"] = spearman(sub, ref[: args.floor_latents])
    results[floor]["first_latents_spearman"] = results[floor]["spearman"]

    print()
    print(
        f"{args.samples} samples x {args.latents} latents, density ~{args.density}, "
        f"{args.dead:.0%} dead, {args.signal} planted; top-k = {args.top}"
    )
    header = f"{'estimator':<34}{'time s':>9}{'× sklearn':>11}{'peak MB':>9}{'Spearman':>10}{'ρ (MI>0)':>10}{'top-k':>7}{'max |Δ|':>10}"
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        print(
            f"{name:<34}{row['seconds']:>9.2f}{row['speedup']:>10.1f}×{row['peak_mb']:>9.0f}"
            f"{row['spearman']:>10.4f}{row['spearman_mi_pos']:>10.4f}{row['top_overlap']:>7.0%}"
            f"{row['max_abs_diff']:>10.2e}"
        )
    print(
        f"Spearman on the first {args.floor_latents} latents: ours vs sklearn "
        f"{results['ours']['first_latents_spearman']:.4f}; sklearn seed 1 vs seed 0 "
        f"{results[floor]['first_latents_spearman']:.4f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": {
                        k: v for k, v in vars(args).items() if k not in ("json", "worker", "out")
                    },
                    "results": results,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
