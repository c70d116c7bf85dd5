"""Per-layer linear probes of the knowledge conflict, and the SAE latents that carry it.

- **Probes** (:func:`train_probes`): per layer, standardisation + L1-regularised logistic
  regression (liblinear), C chosen by question-grouped inner cross-validation on the training
  questions only (AUROC), scored by accuracy and AUROC on held-out questions, mean ± std
  over split seeds.
- **The deployed probe** (:func:`fit_conflict_probe`): a residual-stream
  :class:`~spare_tl.methods.conflict_probe.ConflictProbe` fitted on every probe question.
- **Which latents** (:func:`conflict_latents`): SAE latents ranked by |probe weight| and by
  mutual information with the conflict label, and their overlap with SpARE's functional
  features.
"""

from __future__ import annotations

import logging
import math
import re
import statistics as st
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.features import FunctionalFeatures
from spare_tl.methods.conflict_probe import ConflictProbe
from spare_tl.studies.probe_data import FeatureKind, ProbeDataset, split_by_question

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CS",
    "ConflictLatents",
    "LayerProbeScores",
    "ProbeResults",
    "conflict_latents",
    "fit_conflict_probe",
    "train_probes",
]

#: Inverse regularisation strengths searched by the inner cross-validation.
DEFAULT_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(st.fmean(values)), float(st.pstdev(values)) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------


def _logistic(C: float, seed: int):
    """L1-regularised logistic regression (liblinear), across scikit-learn versions."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(x) for x in re.findall(r"\d+", sklearn.__version__)[:2])
    penalty = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(C=C, solver="liblinear", max_iter=1000, random_state=seed, **penalty)


@dataclass
class _Fit:
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    C: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> _Fit:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = _logistic(C, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x), y)
    return _Fit(
        mean=scaler.mean_.astype(np.float64),
        scale=scaler.scale_.astype(np.float64),
        weight=clf.coef_[0].astype(np.float64),
        bias=float(clf.intercept_[0]),
        C=float(C),
    )


def _choose_C(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: Sequence[float], folds: int, seed: int
) -> float:
    """The C with the best mean inner-CV AUROC (question-grouped folds); ties: smaller C."""
    from sklearn.model_selection import GroupKFold

    n_groups = np.unique(groups).size
    if len(Cs) == 1 or n_groups < 2:
        return float(Cs[-1])
    splitter = GroupKFold(n_splits=min(folds, n_groups))
    splits = list(splitter.split(x, y, groups))
    best, best_score = float(Cs[0]), -math.inf
    for C in sorted(Cs):
        scores = []
        for tr, va in splits:
            if np.unique(y[tr]).size < 2:
                continue
            fit = _fit(x[tr], y[tr], C, seed)
            score = _auroc(y[va], fit.logits(x[va]))
            if not math.isnan(score):
                scores.append(score)
        mean = float(np.mean(scores)) if scores else -math.inf
        if mean > best_score + 1e-12:
            best, best_score = float(C), mean
    return best


def _fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    C: float | None,
    Cs: Sequence[float],
    inner_folds: int,
    seed: int,
) -> _Fit:
    chosen = float(C) if C is not None else _choose_C(x, y, groups, Cs, inner_folds, seed)
    return _fit(x, y, chosen, seed)


@dataclass
class LayerProbeScores:
    """Held-out scores of one layer's probe, one entry per split seed."""

    layer: int
    accuracy: list[float]
    auroc: list[float]
    C: list[float]
    n_nonzero: list[int]

    @property
    def accuracy_mean(self) -> float:
        return _mean_std(self.accuracy)[0]

    @property
    def accuracy_std(self) -> float:
        return _mean_std(self.accuracy)[1]

    @property
    def auroc_mean(self) -> float:
        return _mean_std(self.auroc)[0]

    @property
    def auroc_std(self) -> float:
        return _mean_std(self.auroc)[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "auroc_mean": self.auroc_mean,
            "auroc_std": self.auroc_std,
            "accuracy": self.accuracy,
            "auroc": self.auroc,
            "C": self.C,
            "n_nonzero": self.n_nonzero,
        }


@dataclass
class ProbeResults:
    """Per-layer probe quality on held-out questions, for one kind of input."""

    features: FeatureKind
    model_name: str
    layers: dict[int, LayerProbeScores]
    config: dict[str, Any] = field(default_factory=dict)

    def best_layer(self, max_layer: int | None = None) -> int:
        """The layer with the highest mean AUROC (then accuracy, then the earlier layer),
        among layers ≤ ``max_layer`` when given."""
        allowed = [k for k in self.layers if max_layer is None or k <= max_layer]
        if not allowed:
            raise ValueError(f"no probed layer is <= {max_layer} (layers: {sorted(self.layers)})")

        def key(k: int) -> tuple[float, float, int]:
            s = self.layers[k]
            auroc = -1.0 if math.isnan(s.auroc_mean) else s.auroc_mean
            return (round(auroc, 12), round(s.accuracy_mean, 12), -k)

        return max(allowed, key=key)

    def to_json(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "model": self.model_name,
            "best_layer": self.best_layer() if self.layers else None,
            "config": self.config,
            "layers": {str(k): v.to_json() for k, v in sorted(self.layers.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProbeResults:
        layers = {
            int(k): LayerProbeScores(
                layer=int(k),
                accuracy=[float(x) for x in v["accuracy"]],
                auroc=[float(x) for x in v["auroc"]],
                C=[float(x) for x in v["C"]],
                n_nonzero=[int(x) for x in v["n_nonzero"]],
            )
            for k, v in data["layers"].items()
        }
        return cls(
            features=data["features"],
            model_name=data.get("model", ""),
            layers=layers,
            config=dict(data.get("config", {})),
        )

    def save(self, path: Path) -> None:
        cache.write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> ProbeResults:
        return cls.from_json(cache.read_json(Path(path)))


def train_probes(
    dataset: ProbeDataset,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    test_fraction: float = 0.25,
    features: FeatureKind = "resid",
    layers: Sequence[int] | None = None,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    inner_folds: int = 3,
    progress: bool = True,
) -> ProbeResults:
    """Per layer and split seed: fit an L1 probe on the training questions, score it on the
    held-out ones (accuracy at p = 0.5, AUROC).

    ``C`` fixes the inverse regularisation strength; by default it is chosen from ``Cs`` by
    question-grouped ``inner_folds``-fold cross-validation inside the training questions.
    """
    if not seeds:
        raise ValueError("give at least one split seed")
    if features not in ("resid", "sae"):
        raise ValueError(f"features must be 'resid' or 'sae', got {features!r}")
    available = dataset.layers if features == "resid" else dataset.sae_layers
    if not available:
        raise ValueError("the dataset holds no SAE codes: build it with saes={layer: sae}")
    chosen = sorted(available) if layers is None else sorted({int(x) for x in layers})
    y = dataset.labels.numpy()
    groups = dataset.question_ids.numpy()
    splits = {seed: split_by_question(dataset.question_ids, test_fraction, seed) for seed in seeds}
    out: dict[int, LayerProbeScores] = {}
    for layer in tqdm(chosen, desc=f"probes ({features})", disable=not progress, leave=False):
        x = dataset.features(layer, features).numpy().astype(np.float64)
        scores = LayerProbeScores(layer=layer, accuracy=[], auroc=[], C=[], n_nonzero=[])
        for seed in seeds:
            train, test = splits[seed]
            fit = _fit_probe(
                x[train],
                y[train],
                groups[train],
                C=C,
                Cs=Cs,
                inner_folds=inner_folds,
                seed=seed,
            )
            logits = fit.logits(x[test])
            scores.accuracy.append(float(((logits >= 0).astype(int) == y[test]).mean()))
            scores.auroc.append(_auroc(y[test], logits))
            scores.C.append(fit.C)
            scores.n_nonzero.append(int((fit.weight != 0).sum()))
        out[layer] = scores
        logger.debug(
            "layer %d (%s): accuracy %.3f, AUROC %.3f",
            layer,
            features,
            scores.accuracy_mean,
            scores.auroc_mean,
        )
    config = {
        "seeds": list(seeds),
        "test_fraction": test_fraction,
        "C": C,
        "Cs": list(Cs),
        "inner_folds": inner_folds,
        "probe": "standardise + L1 logistic regression (liblinear)",
        "dataset": cache.fingerprint(dataset.config),
        "n_prompts": len(dataset),
        "n_questions": len(dataset.questions),
    }
    return ProbeResults(features=features, model_name=dataset.model_name, layers=out, config=config)


def fit_conflict_probe(
    dataset: ProbeDataset,
    layer: int,
    *,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    inner_folds: int = 3,
    seed: int = 0,
    threshold: float = 0.5,
) -> ConflictProbe:
    """A residual-stream :class:`ConflictProbe` at ``layer`` fitted on the whole dataset
    (C by question-grouped cross-validation unless given)."""
    x = dataset.features(layer, "resid").numpy().astype(np.float64)
    fit = _fit_probe(
        x,
        dataset.labels.numpy(),
        dataset.question_ids.numpy(),
        C=C,
        Cs=Cs,
        inner_folds=inner_folds,
        seed=seed,
    )
    return ConflictProbe(
        layer=layer,
        weight=torch.from_numpy(fit.weight),
        bias=fit.bias,
        mean=torch.from_numpy(fit.mean),
        scale=torch.from_numpy(fit.scale),
        threshold=threshold,
        C=fit.C,
        model_name=dataset.model_name,
    )


# --------------------------------------------------------------------------------------
# Which SAE latents carry the conflict
# --------------------------------------------------------------------------------------


@dataclass
class ConflictLatents:
    """SAE latents that carry the conflict signal at one layer, and SpARE's features there."""

    layer: int
    top_by_weight: list[int]  # by |probe weight| (standardised inputs), non-zero only
    top_by_mutual_information: list[int]
    weight: Float[Tensor, " d_sae"]
    mutual_information: Float[Tensor, " d_sae"]
    expectation: Float[Tensor, " d_sae"]  # mean(z | conflict) − mean(z | no conflict)
    context_features: list[int]
    memory_features: list[int]
    n_active: int  # latents not constant over the prompts
    C: float

    def overlap(self) -> dict[str, list[int]]:
        """Latents in both a top list and a functional-feature set."""
        out = {}
        for top_name, top in (
            ("weight", self.top_by_weight),
            ("mutual_information", self.top_by_mutual_information),
        ):
            for feat_name, feats in (
                ("context", self.context_features),
                ("memory", self.memory_features),
            ):
                out[f"{top_name}&{feat_name}"] = sorted(set(top) & set(feats))
        return out

    def expected_overlap(self, top_n: int) -> float:
        """Expected size of (top ``top_n`` ∩ functional features) for random active latents."""
        n_func = len(set(self.context_features) | set(self.memory_features))
        return top_n * n_func / max(self.n_active, 1)

    def to_json(self) -> dict[str, Any]:
        def info(i: int) -> dict[str, Any]:
            mi_rank = int((self.mutual_information > self.mutual_information[i]).sum()) + 1
            return {
                "latent": i,
                "probe_weight": float(self.weight[i]),
                "mutual_information": float(self.mutual_information[i]),
                "mutual_information_rank": mi_rank,
                "expectation": float(self.expectation[i]),
            }

        top_n = max(len(self.top_by_weight), len(self.top_by_mutual_information))
        return {
            "layer": self.layer,
            "C": self.C,
            "n_active": self.n_active,
            "n_nonzero_weights": int((self.weight != 0).sum()),
            "top_by_weight": [info(i) for i in self.top_by_weight],
            "top_by_mutual_information": [info(i) for i in self.top_by_mutual_information],
            "context_features": [info(i) for i in self.context_features],
            "memory_features": [info(i) for i in self.memory_features],
            "overlap": self.overlap(),
            "expected_overlap_by_chance": self.expected_overlap(top_n),
        }


def conflict_latents(
    dataset: ProbeDataset,
    layer: int,
    features: FunctionalFeatures | None = None,
    *,
    top_n: int = 20,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    inner_folds: int = 3,
    seed: int = 0,
) -> ConflictLatents:
    """Rank the layer's SAE latents by |L1-probe weight| and by MI with the conflict label.

    The probe is fitted on all prompts of the dataset on standardised codes (so weights are
    comparable across latents); MI is the k-NN estimator of :mod:`spare_tl.mutual_info`.
    """
    from spare_tl.mutual_info import expectation_difference, mutual_information

    codes = dataset.features(layer, "sae")
    y = dataset.labels
    fit = _fit_probe(
        codes.numpy().astype(np.float64),
        y.numpy(),
        dataset.question_ids.numpy(),
        C=C,
        Cs=Cs,
        inner_folds=inner_folds,
        seed=seed,
    )
    weight = torch.from_numpy(fit.weight).float()
    mi = mutual_information(codes, y, seed=seed).float()
    expectation = expectation_difference(codes, y).float()
    nonzero = torch.nonzero(weight).squeeze(1)
    by_weight = nonzero[torch.argsort(weight[nonzero].abs(), descending=True, stable=True)]
    positive = torch.nonzero(mi > 0).squeeze(1)
    by_mi = positive[torch.argsort(mi[positive], descending=True, stable=True)]
    ctx: list[int] = []
    mem: list[int] = []
    if features is not None and layer in features.layers:
        ctx = features.layers[layer].context_features.tolist()
        mem = features.layers[layer].memory_features.tolist()
    return ConflictLatents(
        layer=layer,
        top_by_weight=by_weight[:top_n].tolist(),
        top_by_mutual_information=by_mi[:top_n].tolist(),
        weight=weight,
        mutual_information=mi,
        expectation=expectation,
        context_features=ctx,
        memory_features=mem,
        n_active=int((codes.amax(0) != codes.amin(0)).sum()),
        C=fit.C,
    )
