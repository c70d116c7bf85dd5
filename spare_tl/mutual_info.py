"""Feature statistics: mutual information I(Z_i; Y) and expectation difference E_i per SAE latent.

SpARE (``docs/method.md``, "Feature statistics") scores every latent Z_i against the
behaviour label Y (1 use-context, 0 use-memory) with the k-nearest-neighbour estimator for a
continuous feature and a discrete label (Ross 2014), on min-max-normalised activations,
exactly as ``sklearn.feature_selection.mutual_info_classif(X, y, discrete_features=False)``
does.

scikit-learn builds KD-trees feature by feature (~15 ms per latent at 2,000 prompts, minutes
per 16k-latent SAE). Here every feature is one-dimensional, so the same quantities come from
sorting: the k-th neighbour within a class is found among the k sorted neighbours on either
side, and the number of points inside a radius from ``searchsorted`` on the sorted column.
All latents of a chunk are processed at once, in float64.

scikit-learn breaks ties (the many exact zeros of sparse SAE codes) with noise of size
1e-10. Which zero "wins" a tie is random, and for weakly informative latents that noise is
as large as the signal: two scikit-learn runs with different ``random_state`` disagree
substantially on such latents. ``noise="sklearn"`` draws scikit-learn's exact noise stream and
reproduces its numbers; the default ``noise="independent"`` draws its own (seeded, the same
for any chunking).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

NoiseSource = Literal["independent", "sklearn"]

_MEMORY_BUDGET_BYTES = 512 * 2**20
# float64/int64 temporaries alive per (latent, sample) during one chunk, measured generously
_BYTES_PER_ELEMENT = 8 * 24
# torch noise is drawn in fixed blocks of latents so that it does not depend on chunking
_NOISE_BLOCK = 32
_MAX_BOUNDARY_STEPS = 64
_CPU_MAX_CHUNK = 64


def minmax_normalise(acts: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """Scale every column (latent) to [0, 1] over the samples; constant columns become 0.

    Floating inputs keep their dtype; integer inputs become float64.
    """
    if acts.ndim != 2:
        raise ValueError(f"acts must be 2-D (samples, latents), got shape {tuple(acts.shape)}")
    x = acts if acts.is_floating_point() else acts.to(torch.float64)
    lo = x.amin(0, keepdim=True)
    span = x.amax(0, keepdim=True) - lo
    constant = span == 0
    return torch.where(constant, torch.zeros_like(x), (x - lo) / torch.where(constant, 1, span))


def expectation_difference(
    acts: Float[Tensor, "n d"], labels: Int[Tensor, " n"]
) -> Float[Tensor, " d"]:
    """E_i = mean(Z_i | context, label 1) − mean(Z_i | memory, label 0), on raw activations.

    Returned in float64.
    """
    acts, y = _validate(acts, labels)
    x = acts.to(torch.float64)
    return x[y == 1].mean(0) - x[y == 0].mean(0)


def mutual_information_reference(
    acts: Float[Tensor, "n d"],
    labels: Int[Tensor, " n"],
    n_neighbors: int = 3,
    seed: int = 0,
    n_jobs: int | None = None,
) -> Float[Tensor, " d"]:
    """I(Z_i; Y) per latent by scikit-learn's ``mutual_info_classif`` (the reference).

    One call on the min-max-normalised float64 activations; scikit-learn loops over the
    latents itself (``n_jobs`` parallelises that loop with joblib).
    """
    from sklearn.feature_selection import mutual_info_classif

    acts, y = _validate(acts, labels)
    _check_n_neighbors(n_neighbors)
    x = minmax_normalise(acts.detach().cpu().to(torch.float64)).numpy()
    mi = mutual_info_classif(
        x,
        y.cpu().numpy(),
        discrete_features=False,
        n_neighbors=n_neighbors,
        random_state=seed,
        n_jobs=n_jobs,
    )
    return torch.from_numpy(np.asarray(mi, dtype=np.float64))


def mutual_information(
    acts: Float[Tensor, "n d"],
    labels: Int[Tensor, " n"],
    n_neighbors: int = 3,
    chunk_size: int | None = None,
    seed: int = 0,
    skip_inactive: bool = True,
    progress: bool = False,
    device: torch.device | str | None = None,
    noise: NoiseSource = "independent",
    workers: int | None = None,
) -> Float[Tensor, " d"]:
    """I(Z_i; Y) per latent: scikit-learn's k-NN estimator, vectorised over latents.

    Args:
        acts: SAE latent activations, one row per prompt.
        labels: 1 for use-context prompts, 0 for use-memory prompts.
        n_neighbors: k of the estimator (scikit-learn's and SpARE's default: 3).
        chunk_size: latents per chunk; ``None`` picks it from a ~512 MB memory budget
            (at most 64 on CPU, where small cache-resident chunks are fastest).
        seed: seeds the tie-breaking noise.
        skip_inactive: give latents that are constant over the prompts (dead) MI 0 without
            computing them (scikit-learn returns a small noise estimate for those).
        progress: show a progress bar over chunks.
        device: where to compute (default: ``acts.device``).
        noise: ``"independent"`` (seeded per block of latents, so independent of chunking
            and memory-bounded) or ``"sklearn"`` (scikit-learn's exact noise stream for
            ``random_state=seed``: reproduces its numbers to ~1e-15, but allocates an (n, d)
            float64 array as scikit-learn does).
        workers: CPU chunks computed in parallel threads (default: torch's thread count;
            the sorts and searches release the GIL). Results do not depend on it.

    Returns:
        float64 tensor of shape (d,), in nats, on ``acts.device``.
    """
    acts, y = _validate(acts, labels)
    _check_n_neighbors(n_neighbors)
    if noise not in ("independent", "sklearn"):
        raise ValueError(f"noise must be 'independent' or 'sklearn', got {noise!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    out_device = acts.device
    device = torch.device(device) if device is not None else acts.device
    n, d = acts.shape

    if skip_inactive:
        active = (acts.amax(0) != acts.amin(0)).nonzero().squeeze(1).cpu()
    else:
        active = torch.arange(d)
    mi = torch.zeros(d, dtype=torch.float64)
    if active.numel() == 0:
        return mi.to(out_device)

    if chunk_size is None:
        chunk_size = max(1, _MEMORY_BUDGET_BYTES // (_BYTES_PER_ELEMENT * n))
        if device.type == "cpu":  # small working sets stay in cache: faster on CPU
            chunk_size = min(chunk_size, _CPU_MAX_CHUNK)
    numpy_noise = (
        np.random.RandomState(seed).standard_normal(size=(n, d)) if noise == "sklearn" else None
    )
    stats = _LabelStats(y.to(device), n_neighbors)
    logger.debug(
        "mutual information: %d samples, %d/%d latents active, chunks of %d",
        n,
        active.numel(),
        d,
        chunk_size,
    )

    chunks = [active[i : i + chunk_size] for i in range(0, active.numel(), chunk_size)]

    def run(cols: Tensor) -> None:
        x = acts[:, cols.to(acts.device)].to(device=device, dtype=torch.float64).T.contiguous()
        if numpy_noise is not None:
            eps = torch.from_numpy(np.ascontiguousarray(numpy_noise[:, cols.numpy()].T))
        else:
            eps = _blockwise_noise(cols, n, seed)
        mi[cols] = _mi_chunk(x, eps.to(device), stats).cpu()

    workers = torch.get_num_threads() if workers is None else int(workers)
    bar = tqdm(total=len(chunks), desc="mutual information", unit="chunk", disable=not progress)
    if device.type != "cpu" or workers <= 1 or len(chunks) < 2:
        for cols in chunks:
            run(cols)
            bar.update()
    else:
        # one torch thread per worker: the chunks, not the ops inside them, run in parallel
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(run, chunks):
                    bar.update()
        finally:
            torch.set_num_threads(threads)
    bar.close()
    return mi.to(out_device)


class _LabelStats:
    """What the estimator needs from the labels; the same for every latent."""

    def __init__(self, y: Tensor, n_neighbors: int) -> None:
        n = y.numel()
        self.class_index = [(y == c).nonzero().squeeze(1) for c in (0, 1)]
        self.class_counts = [int(idx.numel()) for idx in self.class_index]
        self.ks = [min(n_neighbors, count - 1) for count in self.class_counts]
        psi = torch.special.digamma
        f64 = torch.float64
        counts = torch.tensor(self.class_counts, dtype=f64)
        ks = torch.tensor(self.ks, dtype=f64)
        # digamma(N) + mean_i digamma(k_i) - mean_i digamma(N_{y_i}): the latent-free terms
        self.constant = float(
            psi(torch.tensor(float(n), dtype=f64))
            + (counts * psi(ks)).sum() / n
            - (counts * psi(counts)).sum() / n
        )
        self.digamma_table = psi(torch.arange(n + 1, dtype=f64, device=y.device))


def _mi_chunk(x: Tensor, eps: Tensor, stats: _LabelStats) -> Tensor:
    """MI of every row of ``x`` (latents, samples) with the labels; ``eps`` is N(0, 1) noise."""
    n = x.shape[1]
    # min-max normalisation, same arithmetic as minmax_normalise
    lo = x.amin(1, keepdim=True)
    span = x.amax(1, keepdim=True) - lo
    constant = span == 0
    x = torch.where(constant, torch.zeros_like(x), (x - lo) / torch.where(constant, 1, span))
    # sklearn.preprocessing.scale(with_mean=False): divide by the population std
    std = (x - x.mean(1, keepdim=True)).square_().mean(1, keepdim=True).sqrt_()
    x = x.div_(torch.where(std < 10 * torch.finfo(torch.float64).eps, 1, std))
    # tie-breaking noise as in sklearn's _estimate_mi
    x = x.add_(eps * (1e-10 * x.abs().mean(1, keepdim=True).clamp_min_(1)))

    queries, radii = [], []
    for c in (0, 1):
        class_sorted = _sort_rows(x.index_select(1, stats.class_index[c]))
        queries.append(class_sorted)
        radii.append(_kth_neighbour_distance(class_sorted, stats.ks[c]))
    q = torch.cat(queries, 1)
    r = torch.cat(radii, 1)
    r = torch.nextafter(r, torch.zeros_like(r))
    m = _count_within(_sort_rows(x), q, r)
    psi_m = stats.digamma_table[m].sum(1) / n
    return (stats.constant - psi_m).clamp_min_(0)


def _sort_rows(x: Tensor) -> Tensor:
    """Values of each row in ascending order (numpy's vectorised sort is much faster on CPU)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def _kth_neighbour_distance(s: Tensor, k: int) -> Tensor:
    """Distance from each point of sorted rows ``s`` to its k-th nearest other point.

    In 1-D the k nearest points are some a to the left and k − a to the right, so the
    distance is min over a of max(distance to a-th left, distance to (k − a)-th right).
    """
    rows, width = s.shape
    pad = s.new_full((rows, k), torch.inf)
    padded = torch.cat([-pad, s, pad], 1)

    def left(a: int) -> Tensor:  # distance to the a-th point on the left (a >= 1)
        return torch.sub(s, padded[:, k - a : k - a + width])

    def right(b: int) -> Tensor:  # distance to the b-th point on the right (b >= 1)
        return torch.sub(padded[:, k + b : k + b + width], s)

    best = torch.minimum(right(k), left(k))
    for a in range(1, k):
        best = torch.minimum(best, torch.maximum(left(a), right(k - a)), out=best)
    return best


def _count_within(sorted_x: Tensor, q: Tensor, r: Tensor) -> Tensor:
    """Per query, how many points of its row satisfy (q − x_j)² <= r², the point itself included.

    This is the test of scikit-learn's ``KDTree.query_radius`` (squared distances; with
    ``r = nextafter(radius, 0)`` it excludes the points at exactly the k-th neighbour
    distance). The points that pass form a contiguous run of the sorted row around the
    query: ``searchsorted`` on ``q ± r`` finds it up to rounding, and the ends are then
    moved until the exact test holds at both.
    """
    rows, n = sorted_x.shape
    r2 = r * r
    # padded[:, j + 1] = sorted_x[:, j]; the ±inf ends never pass the test
    pad = sorted_x.new_full((rows, 1), torch.inf)
    padded = torch.cat([-pad, sorted_x, pad], 1)

    def inside(idx: Tensor) -> Tensor:
        diff = q - padded.gather(1, idx + 1)
        return diff.mul_(diff) <= r2

    lo = _searchsorted_rows(sorted_x, q - r, right=True)
    hi = _searchsorted_rows(sorted_x, q + r, right=False)
    # The query itself passes, so the run is non-empty. Each end steps outwards while the
    # next point passes, else inwards while the end point fails; usually no step is needed.
    for _ in range(_MAX_BOUNDARY_STEPS):
        grow = inside(lo - 1)
        shrink = ~(grow | inside(lo))
        if not (grow.any() or shrink.any()):
            break
        lo = lo - grow.long() + shrink.long()
    for _ in range(_MAX_BOUNDARY_STEPS):
        grow = inside(hi)
        shrink = ~(grow | inside(hi - 1))
        if not (grow.any() or shrink.any()):
            break
        hi = hi + grow.long() - shrink.long()
    return hi - lo


def _searchsorted_rows(sorted_x: Tensor, values: Tensor, right: bool) -> Tensor:
    """``torch.searchsorted`` row by row; on CPU numpy's 1-D search is about twice as fast."""
    if sorted_x.device.type != "cpu":
        return torch.searchsorted(sorted_x, values.contiguous(), right=right)
    side = "right" if right else "left"
    s, v = sorted_x.numpy(), values.numpy()
    out = np.empty(v.shape, dtype=np.int64)
    for row in range(s.shape[0]):
        out[row] = np.searchsorted(s[row], v[row], side=side)
    return torch.from_numpy(out)


def _blockwise_noise(cols: Tensor, n: int, seed: int) -> Tensor:
    """N(0, 1) noise of shape (len(cols), n); row j depends only on (seed, latent cols[j])."""
    blocks = torch.unique(cols // _NOISE_BLOCK)
    pieces = [
        np.random.default_rng([seed, b]).standard_normal((_NOISE_BLOCK, n), dtype=np.float32)
        for b in blocks.tolist()
    ]
    block_pos = torch.searchsorted(blocks, cols // _NOISE_BLOCK)
    return torch.from_numpy(np.concatenate(pieces))[block_pos * _NOISE_BLOCK + cols % _NOISE_BLOCK]


def _check_n_neighbors(n_neighbors: int) -> None:
    if not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}")


def _validate(acts: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and labels; return (acts, labels as int64 on acts' device)."""
    acts = torch.as_tensor(acts)
    labels = torch.as_tensor(labels)
    if acts.ndim != 2:
        raise ValueError(f"acts must be 2-D (samples, latents), got shape {tuple(acts.shape)}")
    if labels.ndim != 1 or labels.shape[0] != acts.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per row of acts: acts has shape "
            f"{tuple(acts.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.is_complex() or not torch.isin(labels, torch.tensor([0, 1]).to(labels)).all():
        values = sorted({float(v) for v in labels.unique().tolist()})[:10]
        raise ValueError(
            f"labels must be binary: 1 = use-context, 0 = use-memory; got values {values}"
        )
    if not torch.isfinite(acts).all():
        raise ValueError("acts contain NaN or infinite values")
    y = labels.to(device=acts.device, dtype=torch.long)
    for value, name in ((1, "use-context (label 1)"), (0, "use-memory (label 0)")):
        count = int((y == value).sum())
        if count < 2:
            raise ValueError(
                f"the {name} group has {count} sample(s); at least 2 per group are needed "
                "to estimate mutual information: collect more prompts"
            )
    return acts, y
