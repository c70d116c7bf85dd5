"""Vectorised mutual information against scikit-learn's mutual_info_classif (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from spare_tl.mutual_info import (
    expectation_difference,
    minmax_normalise,
    mutual_information,
    mutual_information_reference,
)


def _dense(n: int = 240, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features; the first half shifted in the context group by growing amounts."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.45).astype(np.int64)
    x = rng.normal(size=(n, d))
    x[:, : d // 2] += y[:, None] * np.linspace(0.2, 2.0, d // 2)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _sparse(
    n: int = 300, d: int = 48, dead: int = 0, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK/ReLU-like codes: mostly exact zeros; some latents fire more in one group."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int64)
    sign = (2 * y - 1)[:, None]
    rate = rng.uniform(0.03, 0.4, d)
    strength = np.where(np.arange(d) < d // 3, 0.8, 0.0) * rng.choice([-1, 1], d)
    active = rng.random((n, d)) < np.clip(rate * (1 + strength * sign), 0, 1)
    x = np.where(active, rng.exponential(1.0, (n, d)) * (1 + 0.5 * strength * sign), 0.0)
    x[:, d - dead :] = 0.0 if dead else x[:, d - dead :]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    top_a = set(torch.argsort(a, descending=True)[:k].tolist())
    top_b = set(torch.argsort(b, descending=True)[:k].tolist())
    return len(top_a & top_b) / k


def test_minmax_normalise_columns_and_constants():
    acts = torch.tensor([[0.0, 5.0, 1.0], [2.0, 5.0, 3.0], [4.0, 5.0, 2.0]])
    out = minmax_normalise(acts)
    assert torch.allclose(out[:, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(out[:, 1], torch.zeros(3))
    assert torch.allclose(out[:, 2], torch.tensor([0.0, 1.0, 0.5]))
    assert out.dtype == torch.float32


def test_expectation_difference_on_raw_activations():
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [10.0, 2.0], [20.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    e = expectation_difference(acts, labels)
    assert e.dtype == torch.float64
    assert torch.allclose(e, torch.tensor([13.0, 3.0], dtype=torch.float64))


def test_dense_matches_sklearn():
    # continuous features have no ties, so the tie-breaking noise does not matter
    acts, labels = _dense()
    ref = mutual_information_reference(acts, labels)
    ours = mutual_information(acts, labels)
    assert ours.dtype == torch.float64 and ours.shape == (acts.shape[1],)
    assert (ours - ref).abs().max() < 1e-9
    assert ref[acts.shape[1] // 2 :].max() < ref[-3 + acts.shape[1] // 2 : acts.shape[1] // 2].min()


def test_sparse_with_sklearn_noise_reproduces_sklearn_exactly():
    acts, labels = _sparse(dead=4)
    ref = mutual_information_reference(acts, labels, seed=3)
    ours = mutual_information(acts, labels, seed=3, noise="sklearn", skip_inactive=False)
    assert (ours - ref).abs().max() < 1e-9


def test_sparse_agrees_with_sklearn_statistically():
    # On sparse codes the tie-breaking noise moves single estimates by ~0.02 nats (sklearn
    # against itself across seeds too), so compare averages over a few seeds.
    acts, labels = _sparse()
    seeds = range(4)
    ref = torch.stack([mutual_information_reference(acts, labels, seed=s) for s in seeds])
    ours = torch.stack([mutual_information(acts, labels, seed=s) for s in seeds])
    bias = ours.mean(0) - ref.mean(0)
    assert abs(bias.mean()) < 0.005
    assert bias.abs().max() < 0.08  # ~4 standard errors of a 4-seed mean difference
    # the unplanted two thirds are near-zero noise: sklearn vs itself (one seed each) ~0.7 here
    assert spearmanr(ours.mean(0), ref.mean(0)).statistic >= 0.7
    assert abs(ours.std(0).mean() - ref.std(0).mean()) < 0.005  # same noise sensitivity
    planted = set(range(acts.shape[1] // 3))
    top = torch.argsort(ours.mean(0), descending=True)[:10].tolist()
    assert len(set(top) & planted) >= 9
    # both single out the planted latents (their order among themselves is noise-level)
    assert _top_overlap(ours.mean(0), ref.mean(0), len(planted)) >= 0.8


def test_dead_latents_get_zero():
    acts, labels = _sparse(dead=5)
    acts[:, 3] = 7.0  # constant but non-zero: never varies, so also inactive
    ours = mutual_information(acts, labels)
    ref = mutual_information_reference(acts, labels)
    dead = [3, *range(acts.shape[1] - 5, acts.shape[1])]
    assert torch.equal(ours[dead], torch.zeros(len(dead), dtype=torch.float64))
    assert ref[dead].max() < 0.1  # sklearn estimates pure noise there: small, not always 0
    assert ours[[i for i in range(acts.shape[1]) if i not in dead]].gt(0).any()


def test_deterministic_and_chunk_independent():
    acts, labels = _sparse(dead=3)
    full = mutual_information(acts, labels, seed=5)
    assert torch.equal(full, mutual_information(acts, labels, seed=5))
    for chunk in (1, 7, 1000):
        assert torch.equal(full, mutual_information(acts, labels, seed=5, chunk_size=chunk))
    assert not torch.equal(full, mutual_information(acts, labels, seed=6))
    # skipping dead latents does not change the others' noise
    kept = mutual_information(acts, labels, seed=5, skip_inactive=False)
    assert torch.equal(full[:-3], kept[:-3])


def test_ties_beyond_noise_are_handled():
    # many duplicated non-zero values (quantised codes) and a small group
    rng = np.random.default_rng(2)
    labels = torch.tensor([0] * 12 + [1] * 40)
    acts = torch.tensor(rng.integers(0, 3, size=(52, 6)), dtype=torch.float32)
    acts[:12, 0] += 2
    ref = mutual_information_reference(acts, labels, seed=0)
    ours = mutual_information(acts, labels, seed=0, noise="sklearn")
    assert (ours - ref).abs().max() < 1e-9


def test_n_neighbors():
    acts, labels = _dense(n=80, d=5)
    for k in (1, 2, 5):
        ref = mutual_information_reference(acts, labels, n_neighbors=k)
        ours = mutual_information(acts, labels, n_neighbors=k, noise="sklearn")
        assert (ours - ref).abs().max() < 1e-9


def test_a_group_of_two_stays_close_to_the_reference():
    # A group of 2: k = min(n_neighbors, 1). sklearn switches to brute-force neighbours for
    # groups smaller than 2 * n_neighbors, whose GEMM distances are only accurate to ~1e-8
    # and so blur its own 1e-10 tie-breaking: agreement is close but not exact there.
    acts, _ = _dense(n=60, d=5)
    labels = torch.zeros(60, dtype=torch.long)
    labels[:2] = 1
    ref = mutual_information_reference(acts, labels)
    ours = mutual_information(acts, labels, noise="sklearn")
    assert (ours - ref).abs().max() < 0.02


def test_bad_labels_or_activations_are_refused_with_a_message():
    acts = torch.rand(6, 3)
    with pytest.raises(ValueError, match="binary"):
        mutual_information(acts, torch.tensor([0, 1, 2, 0, 1, 0]))
    with pytest.raises(ValueError, match="use-context .*1 sample.*more prompts"):
        mutual_information(acts, torch.tensor([1, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="use-memory .*0 sample"):
        expectation_difference(acts, torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="one entry per row"):
        mutual_information(acts, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="2-D"):
        mutual_information(torch.rand(6), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        mutual_information(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="n_neighbors"):
        mutual_information(acts, torch.tensor([0, 1, 0, 1, 0, 1]), n_neighbors=0)
    with pytest.raises(ValueError, match="binary"):
        mutual_information_reference(acts, torch.tensor([0, 1, 0, 1, 0, -1]))


@pytest.mark.parametrize("noise", ["independent", "sklearn"])
def test_parallel_chunks_give_the_same_numbers(noise):
    acts, y = _sparse()
    threads = torch.get_num_threads()
    serial = mutual_information(acts, y, chunk_size=5, noise=noise, workers=1)
    parallel = mutual_information(acts, y, chunk_size=5, noise=noise, workers=3)
    assert torch.equal(serial, parallel)
    assert torch.get_num_threads() == threads  # restored after the parallel section
