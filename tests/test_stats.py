"""Bootstrap intervals over questions and paired tests (spare_tl.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from spare_tl.stats import (
    bootstrap_ci,
    condition_intervals,
    mcnemar,
    outcome_matrix,
    paired_bootstrap,
)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(0)
    small = (rng.random((20, 5)) < 0.4).astype(float)
    large = (rng.random((400, 5)) < 0.4).astype(float)
    a, b = bootstrap_ci(small), bootstrap_ci(large)
    for ci in (a, b):
        assert ci["low"] <= ci["mean"] <= ci["high"]
    assert b["high"] - b["low"] < a["high"] - a["low"]
    assert bootstrap_ci(np.ones((10, 3))) == {"mean": 100.0, "low": 100.0, "high": 100.0}


def test_interval_resamples_questions_not_rows():
    """A question's seeds move together: all-or-nothing questions give a wider interval
    than the same share spread independently over rows."""
    clustered = np.repeat((np.arange(40) % 2 == 0)[:, None], 5, axis=1).astype(float)
    rng = np.random.default_rng(1)
    spread = (rng.permutation(clustered.reshape(-1)).reshape(40, 5)).astype(float)
    wide, narrow = bootstrap_ci(clustered), bootstrap_ci(spread)
    assert (wide["high"] - wide["low"]) > (narrow["high"] - narrow["low"])


def test_paired_bootstrap_difference_and_p_value():
    base = np.zeros((50, 5))
    same = paired_bootstrap(base, base)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    better = base.copy()
    better[:30] = 1
    out = paired_bootstrap(better, base)
    assert out["difference"] == pytest.approx(60.0)
    assert out["low"] > 0 and out["p_value"] < 0.01
    worse = paired_bootstrap(base, better)
    assert worse["difference"] == pytest.approx(-60.0) and worse["high"] < 0
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap(base[:10], base)


def test_mcnemar_exact():
    steered = np.array([1] * 10 + [0] * 5, dtype=bool)
    base = np.array([0] * 10 + [0] * 5, dtype=bool)
    out = mcnemar(steered, base)
    assert (out["gained"], out["lost"]) == (10, 0)
    assert out["p_value"] == pytest.approx(2 / 2**10)
    assert mcnemar(base, base)["p_value"] == 1.0
    # 6 gained, 2 lost: two-sided exact p = 2 * P(X <= 2 | n=8, 1/2) = 2 * 37/256
    s = np.array([1] * 6 + [0] * 2)
    b = np.array([0] * 6 + [1] * 2)
    assert mcnemar(s, b)["p_value"] == pytest.approx(2 * 37 / 256)


def test_condition_intervals_from_labels():
    steered = [["memory", "context", "memory"], ["memory", "neither", "memory"]]
    base = [["context", "context", "memory"], ["context", "neither", "memory"]]
    assert outcome_matrix(steered, "memory").shape == (3, 2)
    out = condition_intervals(steered, base, resamples=200)
    assert out["EM_M"]["ci95"]["mean"] == pytest.approx(100 * 4 / 6)
    assert out["EM_M"]["vs_no_steering"]["mcnemar"] == {"gained": 2, "lost": 0, "p_value": 0.5}
    assert "vs_no_steering" not in condition_intervals(steered)["EM_C"]
    with pytest.raises(ValueError, match="same questions"):
        outcome_matrix([["memory"], ["memory", "context"]], "memory")
