"""Uncertainty for evaluation results: bootstrap intervals over questions and paired tests.

Every evaluation answers the same questions under several demonstration seeds, so the unit
that varies between studies is the **question**: a question's outcome is averaged over its
seeds, and questions are resampled with replacement (a cluster bootstrap; resampling rows
would treat a question's seeds as independent and give intervals that are too narrow).

- :func:`bootstrap_ci`: a percentile interval for the share (%) of rows with an outcome.
- :func:`paired_bootstrap`: steered minus unsteered share, its interval and a two-sided
  p-value, resampling questions jointly in both conditions.
- :func:`mcnemar`: the exact McNemar test on per-(question, seed) pairs, for readers who
  expect it (it ignores the clustering by question; the paired bootstrap does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


def per_question(outcomes: np.ndarray) -> np.ndarray:
    """``[n_questions, n_seeds]`` 0/1 outcomes -> each question's mean over its seeds."""
    arr = np.asarray(outcomes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"outcomes must be a non-empty [questions, seeds] array, got {arr.shape}")
    return arr.mean(axis=1)


def _resample_index(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


def bootstrap_ci(
    outcomes: np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, float]:
    """Mean share (%) of ``[questions, seeds]`` 0/1 outcomes and its percentile bootstrap
    interval over questions: ``{"mean", "low", "high"}``."""
    q = per_question(outcomes)
    idx = _resample_index(len(q), resamples, seed)
    means = q[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return {
        "mean": 100.0 * float(q.mean()),
        "low": 100.0 * float(np.quantile(means, tail)),
        "high": 100.0 * float(np.quantile(means, 1.0 - tail)),
    }


def paired_bootstrap(
    steered: np.ndarray,
    baseline: np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, float]:
    """Difference (points) of ``steered`` minus ``baseline`` shares, with its bootstrap
    interval and a two-sided p-value from the same resamples (questions drawn jointly).

    The p-value is twice the smaller share of resampled differences on either side of 0
    (floored at 1 / resamples, so it is never reported as exactly 0)."""
    s, b = per_question(steered), per_question(baseline)
    if s.shape != b.shape:
        raise ValueError(f"paired outcomes need the same questions: {s.shape} vs {b.shape}")
    d = s - b
    idx = _resample_index(len(d), resamples, seed)
    diffs = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    if not d.any():
        p = 1.0
    else:
        below = float((diffs <= 0).mean())
        above = float((diffs >= 0).mean())
        p = min(1.0, max(2.0 * min(below, above), 1.0 / resamples))
    return {
        "difference": 100.0 * float(d.mean()),
        "low": 100.0 * float(np.quantile(diffs, tail)),
        "high": 100.0 * float(np.quantile(diffs, 1.0 - tail)),
        "p_value": p,
    }


def mcnemar(steered: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Exact (binomial) McNemar test on paired 0/1 outcomes of any matching shape.

    ``gained``: pairs with the outcome only when steered; ``lost``: only without."""
    s = np.asarray(steered, dtype=bool).reshape(-1)
    b = np.asarray(baseline, dtype=bool).reshape(-1)
    if s.shape != b.shape:
        raise ValueError(f"paired outcomes need the same shape: {s.shape} vs {b.shape}")
    gained = int((s & ~b).sum())
    lost = int((~s & b).sum())
    n = gained + lost
    if n == 0:
        p = 1.0
    else:
        k = min(gained, lost)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
        p = min(1.0, 2.0 * tail)
    return {"gained": gained, "lost": lost, "p_value": p}


def outcome_matrix(
    labels_by_seed: Sequence[Sequence[str]], which: str
) -> np.ndarray:  # [questions, seeds]
    """``labels_by_seed[s][i]`` (one label list per seed) -> ``[questions, seeds]`` 0/1."""
    if not labels_by_seed:
        raise ValueError("no seeds")
    n = len(labels_by_seed[0])
    if any(len(x) != n for x in labels_by_seed):
        raise ValueError("every seed must label the same questions")
    return np.array([[lab == which for lab in seed] for seed in labels_by_seed], dtype=float).T


def condition_intervals(
    labels_by_seed: Sequence[Sequence[str]],
    baseline_by_seed: Sequence[Sequence[str]] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Per outcome (EM_C: ``context``, EM_M: ``memory``, ``neither``): the bootstrap
    interval, and against ``baseline_by_seed`` (no steering) the paired bootstrap and
    McNemar tests."""
    out: dict[str, Any] = {}
    for key, which in (("EM_C", "context"), ("EM_M", "memory"), ("neither", "neither")):
        m = outcome_matrix(labels_by_seed, which)
        entry: dict[str, Any] = {"ci95": bootstrap_ci(m, resamples=resamples, seed=seed)}
        if baseline_by_seed is not None:
            b = outcome_matrix(baseline_by_seed, which)
            entry["vs_no_steering"] = {
                "paired_bootstrap": paired_bootstrap(m, b, resamples=resamples, seed=seed),
                "mcnemar": mcnemar(m, b),
            }
        out[key] = entry
    return out
