"""Detecting the knowledge conflict: per-layer linear probes and conditional steering.

The companion study of SpARE (Zhao et al., arXiv 2410.16090) shows that the residual stream
registers a knowledge conflict at mid layers, readable by a linear probe. Here:

- **Probing data** (:func:`build_probe_dataset`): for every question, the same k
  demonstrations followed by the test question once with its conflicting context
  (``sub_context``, label 1) and once with the consistent one (``org_context``, label 0);
  the last-prompt-position residual ``blocks.{l}.hook_resid_post`` at each layer, and the SAE
  codes where an SAE is given. Train/test splits are by question (:func:`split_by_question`).
- **Probes** (:func:`train_probes`): per layer, standardisation + L1-regularised logistic
  regression (liblinear), C chosen by question-grouped inner cross-validation on the training
  questions only (AUROC), scored by accuracy and AUROC on held-out questions, mean ± std
  over split seeds.
- **Which latents** (:func:`conflict_latents`): SAE latents ranked by |probe weight| and by
  mutual information with the conflict label, and their overlap with SpARE's functional
  features.
- **Conditional steering**: :class:`ConflictProbe` is what ``steer(..., when="conflict",
  probe=...)`` runs at its layer during the prompt pass; :func:`evaluate_conditional`
  compares no steering, steering always and steering only flagged rows on a mixed set of
  conflict and no-conflict prompts.

``python -m spare_tl.probes run --layers 6-20`` does all of it for the embedded default and
writes JSON under ``cache_data/<model>/probes/`` (``spare-tl docs`` puts its tables into
``docs/results.md``).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import statistics as st
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.activations import check_layers, last_position_resid
from spare_tl.data.prompts import conflict_prompt, sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.features import FunctionalFeatures
from spare_tl.hardware import add_dtype_argument, load_steering_setup_for
from spare_tl.harness import Condition, NoSteering, SpareMethod, answer_prompts
from spare_tl.layer_spec import parse_layers
from spare_tl.saes import encode_latents, sae_identity, validate_sae
from spare_tl.steering import GateStats

logger = logging.getLogger(__name__)

__all__ = [
    "CONDITIONS",
    "DEFAULT_CS",
    "ConditionalResult",
    "ConflictLatents",
    "ConflictProbe",
    "LayerProbeScores",
    "ProbeDataset",
    "ProbeResults",
    "ProbeStudy",
    "build_probe_dataset",
    "conflict_latents",
    "evaluate_conditional",
    "fit_conflict_probe",
    "parse_layers",
    "probe_prompts",
    "run_probe_study",
    "split_by_question",
    "train_probes",
]

FeatureKind = Literal["resid", "sae"]
STAGE = "probes"
#: Label of a prompt: 1 = conflicting context (``sub_context``), 0 = consistent (``org_context``).
CONFLICT, NO_CONFLICT = 1, 0
#: Inverse regularisation strengths searched by the inner cross-validation.
DEFAULT_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
CONDITIONS = ("no_steering", "steer_always", "steer_on_conflict")
CONDITION_NAMES = {
    "no_steering": "no steering",
    "steer_always": "steer always",
    "steer_on_conflict": "steer when the probe flags a conflict",
}
ROW_TYPES = ("conflict", "no_conflict")


def _question_key(item: ConflictItem) -> str:
    return " ".join(item.question.lower().split())


def _demo_seed(seed: int, index: int) -> int:
    """The demonstration seed of item ``index`` (the same rule as :func:`evaluation.evaluate`)."""
    return seed * 1_000_003 + index


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(st.fmean(values)), float(st.pstdev(values)) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------
# Probing data
# --------------------------------------------------------------------------------------


@dataclass
class ProbePrompts:
    """Paired prompts: row 2j is item j's conflict prompt, row 2j + 1 its consistent one."""

    prompts: list[str]
    labels: Int[Tensor, " n"]
    question_ids: Int[Tensor, " n"]
    item_ids: Int[Tensor, " n"]
    questions: list[str]


def probe_prompts(
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    n_shots: int = 3,
    demo_type: str = "doo",
    seed: int = 0,
    n_demo_sets: int = 1,
) -> ProbePrompts:
    """A conflicting and a consistent prompt per item and demonstration set, same demos.

    Demonstration set ``s`` of item ``i`` uses seed ``(seed + s) * 1_000_003 + i`` (the
    evaluation's rule), never the item's own question.
    """
    if n_demo_sets < 1:
        raise ValueError(f"n_demo_sets must be >= 1, got {n_demo_sets}")
    if not items:
        raise ValueError("no items to probe")
    keys: dict[str, int] = {}
    prompts: list[str] = []
    labels: list[int] = []
    qids: list[int] = []
    iids: list[int] = []
    for s in range(n_demo_sets):
        for i, item in enumerate(items):
            demos = sample_demonstrations(pool, n_shots, seed=_demo_seed(seed + s, i), exclude=item)
            qid = keys.setdefault(_question_key(item), len(keys))
            for context, label in (("sub", CONFLICT), ("org", NO_CONFLICT)):
                prompts.append(conflict_prompt(item, demos, demo_type, context=context))
                labels.append(label)
                qids.append(qid)
                iids.append(i)
    return ProbePrompts(
        prompts=prompts,
        labels=torch.tensor(labels, dtype=torch.long),
        question_ids=torch.tensor(qids, dtype=torch.long),
        item_ids=torch.tensor(iids, dtype=torch.long),
        questions=list(keys),
    )


@dataclass
class ProbeDataset:
    """Last-position residuals (and SAE codes) of conflicting and consistent prompts.

    ``codes`` are stored in float16 (the embedded SAEs are fp16 themselves); use
    :meth:`features` to get float32 inputs for a probe.
    """

    model_name: str
    resid: dict[int, Float[Tensor, "n d_model"]]
    codes: dict[int, Float[Tensor, "n d_sae"]]
    labels: Int[Tensor, " n"]
    question_ids: Int[Tensor, " n"]
    item_ids: Int[Tensor, " n"]
    questions: list[str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.resid)

    @property
    def sae_layers(self) -> list[int]:
        return sorted(self.codes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def features(self, layer: int, kind: FeatureKind = "resid") -> Float[Tensor, "n d"]:
        """Probe inputs at ``layer``: the residual stream or the SAE codes, float32."""
        source = {"resid": self.resid, "sae": self.codes}.get(kind)
        if source is None:
            raise ValueError(f"features must be 'resid' or 'sae', got {kind!r}")
        if layer not in source:
            what = "residuals" if kind == "resid" else "SAE codes"
            raise ValueError(f"no {what} for layer {layer}; have layers {sorted(source)}")
        return source[layer].float()

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        tensors = {f"resid.layer{k}": v.float() for k, v in self.resid.items()}
        tensors |= {f"codes.layer{k}": v.half() for k, v in self.codes.items()}
        tensors |= {
            "labels": self.labels,
            "question_ids": self.question_ids,
            "item_ids": self.item_ids,
        }
        cache.begin_stage(directory)  # incomplete until config.json is written last
        cache.write_tensors(directory / "probe_dataset.safetensors", tensors)
        cache.write_json(
            directory / "questions.json",
            {"model": self.model_name, "questions": self.questions},
        )
        cache.mark_complete(directory, self.config, layers=self.layers, sae_layers=self.sae_layers)

    @classmethod
    def load(cls, directory: Path) -> ProbeDataset:
        directory = Path(directory)
        t = cache.read_tensors(directory / "probe_dataset.safetensors")
        meta = cache.read_json(directory / "questions.json")
        config = cache.read_json(directory / "config.json")["config"]
        return cls(
            model_name=meta["model"],
            resid={
                int(k.removeprefix("resid.layer")): v
                for k, v in t.items()
                if k.startswith("resid.layer")
            },
            codes={
                int(k.removeprefix("codes.layer")): v
                for k, v in t.items()
                if k.startswith("codes.layer")
            },
            labels=t["labels"],
            question_ids=t["question_ids"],
            item_ids=t["item_ids"],
            questions=list(meta["questions"]),
            config=config,
        )


def _sae_hash(sae: Any) -> str:
    return cache.fingerprint(
        {"id": sae_identity(sae), "w": float(sae.W_enc.detach().double().sum()), "d": sae.cfg.d_sae}
    )


def _items_hash(items: Sequence[ConflictItem]) -> str:
    return cache.fingerprint({"items": [it.to_dict() for it in items]})


def build_probe_dataset(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    layers: Sequence[int],
    *,
    n_shots: int = 3,
    demo_type: str = "doo",
    seed: int = 0,
    n_demo_sets: int = 1,
    saes: Mapping[int, Any] | None = None,
    batch_size: int = 16,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ProbeDataset:
    """Residuals (and SAE codes) of paired conflict / no-conflict prompts (cached).

    Cached under ``cache_data/<model>/probes/dataset/``; an unchanged config is loaded.
    SAE codes are taken at every layer of ``layers`` that has an SAE in ``saes``.
    """
    layers = check_layers(model, layers)
    saes = {int(k): v for k, v in (saes or {}).items() if int(k) in layers}
    for layer, sae in saes.items():
        validate_sae(model, sae, layer)
    data = probe_prompts(
        items, pool, n_shots=n_shots, demo_type=demo_type, seed=seed, n_demo_sets=n_demo_sets
    )
    config = {
        "stage": f"{STAGE}/dataset",
        "model": model.cfg.model_name,
        "items": _items_hash(items),
        "pool": _items_hash(pool),
        "layers": layers,
        "saes": {str(k): _sae_hash(v) for k, v in sorted(saes.items())},
        "n_shots": n_shots,
        "demo_type": demo_type,
        "seed": seed,
        "n_demo_sets": n_demo_sets,
        "position": "last prompt token",
        "hook": "hook_resid_post",
        "labels": "1 = sub_context (conflict), 0 = org_context (no conflict)",
    }
    directory = cache.stage_dir(model.cfg.model_name, STAGE, cache_root) / "dataset"
    if use_cache and cache.is_fresh(directory, config):
        logger.info("probe dataset: cached in %s", directory)
        return ProbeDataset.load(directory)
    logger.info(
        "probe dataset: %d prompts (%d questions) at layers %s",
        len(data.prompts),
        len(data.questions),
        layers,
    )
    resid = last_position_resid(
        model, data.prompts, layers, batch_size=batch_size, progress=progress
    )
    codes = {
        layer: encode_latents(sae, resid[layer]).detach().to("cpu", torch.float16)
        for layer, sae in sorted(saes.items())
    }
    dataset = ProbeDataset(
        model_name=model.cfg.model_name,
        resid=resid,
        codes=codes,
        labels=data.labels,
        question_ids=data.question_ids,
        item_ids=data.item_ids,
        questions=data.questions,
        config=config,
    )
    if use_cache:
        dataset.save(directory)
    return dataset


def split_by_question(
    question_ids: Int[Tensor, " n"], test_fraction: float, seed: int
) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
    """Row indices of training and test prompts; every question lies on one side only."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    qids = np.asarray(question_ids)
    unique = np.unique(qids)
    if unique.size < 2:
        raise ValueError(f"need at least 2 distinct questions to split, got {unique.size}")
    n_test = min(max(1, round(test_fraction * unique.size)), unique.size - 1)
    test_q = np.random.default_rng(seed).permutation(unique)[:n_test]
    is_test = np.isin(qids, test_q)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


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


@dataclass
class ConflictProbe:
    """A linear conflict detector on ``blocks.{layer}.hook_resid_post`` at the last prompt
    position: p(conflict) = σ(((h − mean) / scale) · weight + bias), flagged when
    p ≥ ``threshold``."""

    layer: int
    weight: Float[Tensor, " d_model"]
    bias: float
    mean: Float[Tensor, " d_model"]
    scale: Float[Tensor, " d_model"]
    threshold: float = 0.5
    C: float | None = None
    model_name: str = ""

    def __post_init__(self) -> None:
        self.weight = torch.as_tensor(self.weight, dtype=torch.float32).reshape(-1)
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1)
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32).reshape(-1)
        if not (self.weight.shape == self.mean.shape == self.scale.shape):
            raise ValueError("weight, mean and scale must have the same length (d_model)")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if bool((self.scale <= 0).any()):
            raise ValueError("scale must be positive")

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def logits(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """The probe's logit of 'conflict' (float32, on ``resid``'s device)."""
        if resid.shape[-1] != self.d_model:
            raise ValueError(
                f"the probe reads {self.d_model}-wide residuals, got width {resid.shape[-1]}"
            )
        dev = resid.device
        x = (resid.float() - self.mean.to(dev)) / self.scale.to(dev)
        return x @ self.weight.to(dev) + self.bias

    def probability(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        return torch.sigmoid(self.logits(resid))

    def predict(self, resid: Float[Tensor, "*batch d_model"]) -> Bool[Tensor, "*batch"]:
        """True where the probe flags a knowledge conflict."""
        return self.probability(resid) >= self.threshold

    def save(self, directory: Path) -> Path:
        path = Path(directory) / "conflict_probe.safetensors"
        cache.write_tensors(
            path,
            {"weight": self.weight, "mean": self.mean, "scale": self.scale},
            metadata={
                "layer": str(self.layer),
                "bias": repr(float(self.bias)),
                "threshold": repr(float(self.threshold)),
                "C": "" if self.C is None else repr(float(self.C)),
                "model_name": self.model_name,
                "hook_name": self.hook_name,
            },
        )
        return path

    @classmethod
    def load(cls, directory: Path) -> ConflictProbe:
        from safetensors import safe_open

        path = Path(directory)
        if path.is_dir():
            path = path / "conflict_probe.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(
            layer=int(meta["layer"]),
            bias=float(meta["bias"]),
            threshold=float(meta["threshold"]),
            C=float(meta["C"]) if meta.get("C") else None,
            model_name=meta.get("model_name", ""),
            **t,
        )


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


# --------------------------------------------------------------------------------------
# Conditional steering on a mixed set
# --------------------------------------------------------------------------------------


@dataclass
class ConditionalResult:
    """Scores by row type (conflict / no conflict) and condition, plus every prediction."""

    summary: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.summary)

    def save(self, path: Path, predictions_path: Path | None = None) -> None:
        cache.write_json(Path(path), self.to_json())
        if predictions_path is not None:
            cache.write_jsonl(Path(predictions_path), self.predictions)

    @classmethod
    def load(cls, path: Path, predictions_path: Path | None = None) -> ConditionalResult:
        preds = cache.read_jsonl(predictions_path) if predictions_path else []
        return cls(summary=cache.read_json(Path(path)), predictions=preds)


def _share(labels: Sequence[str], which: str) -> float:
    return 100.0 * sum(x == which for x in labels) / max(len(labels), 1)


def evaluate_conditional(
    model,
    features: FunctionalFeatures,
    saes: Mapping[int, Any],
    probe: ConflictProbe,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    direction: Literal["memory", "context"] = "memory",
    edit_strength: float | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n_shots: int = 3,
    demo_type: str = "doo",
    max_new_tokens: int = 12,
    batch_size: int = 16,
    progress: bool = True,
) -> ConditionalResult:
    """No steering, steering always and steering only probe-flagged rows, on a mixed set.

    Every item appears twice per seed, with its conflicting and its consistent context and
    the same demonstrations. Reported per row type and condition (%, mean ± std over seeds):
    EM_M (answers M: on no-conflict rows, the accuracy), EM_C (answers C) and neither; and
    how often the probe flags each row type (its own last-position pass).
    """

    if not items:
        raise ValueError("no evaluation items")
    pool_q = {_question_key(p) for p in pool}
    leaked = [it.question for it in items if _question_key(it) in pool_q]
    if leaked:
        raise ValueError(f"{len(leaked)} evaluation item(s) are pool questions, e.g. {leaked[0]!r}")
    first_edit = features.last_probe_layer(direction)
    if probe.layer > first_edit:
        raise ValueError(
            f"the probe reads layer {probe.layer}, after the first edited layer "
            f"{first_edit}; train it at a layer <= {first_edit}"
        )

    def method_for(cond: str) -> Condition:
        if cond == "no_steering":
            return Condition(cond, NoSteering())
        when = "conflict" if cond == "steer_on_conflict" else "always"
        spare = SpareMethod(
            features,
            saes,
            edit_strength,
            when=when,
            probe=probe if when == "conflict" else None,
            gate_stats=gate_stats,
        )
        return Condition(cond, spare, direction)

    labels: dict[str, dict[str, list[list[str]]]] = {
        rt: {c: [] for c in CONDITIONS} for rt in ROW_TYPES
    }
    flag_rates: dict[str, list[float]] = {rt: [] for rt in ROW_TYPES}
    aurocs: list[float] = []
    gate_stats = GateStats()
    predictions: list[dict[str, Any]] = []
    for seed in seeds:
        data = probe_prompts(items, pool, n_shots=n_shots, demo_type=demo_type, seed=seed)
        row_type = ["conflict" if int(y) == CONFLICT else "no_conflict" for y in data.labels]
        row_item = [items[int(i)] for i in data.item_ids]
        resid = last_position_resid(
            model, data.prompts, [probe.layer], batch_size=batch_size, progress=False
        )[probe.layer]
        score = probe.logits(resid)
        flags = probe.predict(resid).tolist()
        aurocs.append(_auroc(data.labels.numpy(), score.numpy()))
        answers = answer_prompts(
            model,
            data.prompts,
            [method_for(cond) for cond in CONDITIONS],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc=f"seed {seed}",
        )
        for rt in ROW_TYPES:
            idx = [i for i, t in enumerate(row_type) if t == rt]
            flag_rates[rt].append(100.0 * sum(flags[i] for i in idx) / max(len(idx), 1))
            for cond in CONDITIONS:
                labels[rt][cond].append(
                    [behaviour_label(answers[cond][i], row_item[i]) for i in idx]
                )
        for i, item in enumerate(row_item):
            predictions.append(
                {
                    "seed": seed,
                    "question": item.question,
                    "row_type": row_type[i],
                    "probe_flag": bool(flags[i]),
                    "probe_logit": float(score[i]),
                    "org_answer": list(item.org_answer),
                    "sub_answer": list(item.sub_answer),
                    **{f"{c}.prediction": answers[c][i] for c in CONDITIONS},
                    **{f"{c}.label": behaviour_label(answers[c][i], item) for c in CONDITIONS},
                }
            )

    summary: dict[str, Any] = {
        "model": model.cfg.model_name,
        "n_items": len(items),
        "seeds": list(seeds),
        "direction": direction,
        "demo_type": demo_type,
        "n_shots": n_shots,
        "edit_strength": features.strength(direction) if edit_strength is None else edit_strength,
        "feature_layers": features.edit_layers(direction),
        "probe": {"layer": probe.layer, "threshold": probe.threshold, "C": probe.C},
    }
    for rt in ROW_TYPES:
        summary[rt] = {}
        for cond in CONDITIONS:
            per_seed = labels[rt][cond]
            entry: dict[str, Any] = {}
            for metric, which in (("EM_M", "memory"), ("EM_C", "context"), ("neither", "neither")):
                values = [_share(x, which) for x in per_seed]
                mean, std = _mean_std(values)
                entry[metric], entry[f"{metric}_std"] = mean, std
                entry.setdefault("per_seed", {})[metric] = values
            summary[rt][cond] = entry
    rate_c, rate_n = _mean_std(flag_rates["conflict"]), _mean_std(flag_rates["no_conflict"])
    summary["probe_on_eval"] = {
        "flagged_conflict": rate_c[0],
        "flagged_conflict_std": rate_c[1],
        "flagged_no_conflict": rate_n[0],
        "flagged_no_conflict_std": rate_n[1],
        "auroc": _mean_std(aurocs)[0],
        "auroc_std": _mean_std(aurocs)[1],
        "gate_rows": gate_stats.rows,
        "gate_flagged": gate_stats.flagged,
    }
    target = "EM_M" if direction == "memory" else "EM_C"
    nc, c = summary["no_conflict"], summary["conflict"]
    drop = nc["no_steering"]["EM_M"] - nc["steer_on_conflict"]["EM_M"]
    summary["checks"] = {
        "target_metric_on_conflict_rows": target,
        "conflict_gain_always": c["steer_always"][target] - c["no_steering"][target],
        "conflict_gain_conditional": c["steer_on_conflict"][target] - c["no_steering"][target],
        "no_conflict_accuracy_drop_always": nc["no_steering"]["EM_M"] - nc["steer_always"]["EM_M"],
        "no_conflict_accuracy_drop_conditional": drop,
        "no_conflict_within_2_points": bool(abs(drop) <= 2.0),
    }
    return ConditionalResult(summary=summary, predictions=predictions)


# --------------------------------------------------------------------------------------
# The whole study and its table
# --------------------------------------------------------------------------------------


@dataclass
class ProbeStudy:
    """Everything :func:`run_probe_study` produced."""

    dataset: ProbeDataset
    resid: ProbeResults
    sae: ProbeResults | None
    probe: ConflictProbe
    latents: dict[int, ConflictLatents]
    conditional: ConditionalResult | None
    directory: Path

    def table(self) -> str:
        return probes_table(
            self.resid,
            self.sae,
            probe=self.probe,
            latents=self.latents,
            conditional=self.conditional,
        )


def _pm(mean: float, std: float, digits: int = 3) -> str:
    return "—" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def probes_table(
    resid: ProbeResults,
    sae: ProbeResults | None = None,
    *,
    probe: ConflictProbe | None = None,
    latents: Mapping[int, ConflictLatents] | None = None,
    conditional: ConditionalResult | Mapping[str, Any] | None = None,
) -> str:
    """Markdown: probe quality by layer, the deployed probe, latents, conditional steering."""
    best_r = resid.best_layer()
    best_s = sae.best_layer() if sae is not None and sae.layers else None
    lines = [
        "| layer | residual accuracy | residual AUROC | SAE accuracy | SAE AUROC |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer in sorted(set(resid.layers) | set(sae.layers if sae else {})):
        r = resid.layers.get(layer)
        s = sae.layers.get(layer) if sae is not None else None
        cells = [
            _pm(r.accuracy_mean, r.accuracy_std) if r else "—",
            _pm(r.auroc_mean, r.auroc_std) if r else "—",
            _pm(s.accuracy_mean, s.accuracy_std) if s else "—",
            _pm(s.auroc_mean, s.auroc_std) if s else "—",
        ]
        mark = " (best residual)" if layer == best_r else ""
        mark += " (best SAE)" if layer == best_s else ""
        lines.append(f"| {layer}{mark} | " + " | ".join(cells) + " |")
    cfg = resid.config
    lines += [
        "",
        f"{resid.model_name}: conflict (`sub_context`) vs no conflict (`org_context`) prompts, "
        f"{cfg.get('n_questions')} questions ({cfg.get('n_prompts')} prompts), held-out "
        f"questions {cfg.get('test_fraction')}, mean ± std over split seeds {cfg.get('seeds')}. "
        "Probe: standardise + L1 logistic regression, C by question-grouped inner CV "
        f"from {cfg.get('Cs')}. Best residual layer {best_r} "
        f"(AUROC {resid.layers[best_r].auroc_mean:.3f})"
        + (
            f", best SAE layer {best_s} (AUROC {sae.layers[best_s].auroc_mean:.3f})."
            if best_s is not None and sae is not None
            else "."
        ),
    ]
    if probe is not None:
        lines.append(
            f"Deployed probe: layer {probe.layer} (the best residual layer at or before the "
            f"first edited layer), threshold {probe.threshold}, C {probe.C}."
        )
    if latents:
        lines.append("")
        for layer, lat in sorted(latents.items()):
            ov = lat.overlap()
            n = max(len(lat.top_by_weight), len(lat.top_by_mutual_information))
            lines.append(
                f"- layer {layer} SAE latents: top {n} by |probe weight| ∩ context / memory "
                f"features: {ov['weight&context']} / {ov['weight&memory']}; top {n} by MI "
                f"with the conflict label ∩ context / memory features: "
                f"{ov['mutual_information&context']} / {ov['mutual_information&memory']} "
                f"({len(lat.context_features)} + {len(lat.memory_features)} functional "
                f"features; {lat.expected_overlap(n):.2f} expected by chance)."
            )
    if conditional is not None:
        data = conditional.to_json() if hasattr(conditional, "to_json") else conditional
        lines += [
            "",
            "| rows | condition | EM_M (memory answer) | EM_C (context answer) | neither |",
            "|---|---|---:|---:|---:|",
        ]
        for rt, name in (("conflict", "conflict"), ("no_conflict", "no conflict")):
            for cond in CONDITIONS:
                d = data[rt][cond]
                lines.append(
                    f"| {name} | {CONDITION_NAMES[cond]} | {_pm(d['EM_M'], d['EM_M_std'], 1)} "
                    f"| {_pm(d['EM_C'], d['EM_C_std'], 1)} | {d['neither']:.1f} |"
                )
        pe, ch = data["probe_on_eval"], data["checks"]
        lines += [
            "",
            f"Conditional steering to {data['direction']} (α = {data['edit_strength']}, "
            f"layers {data['feature_layers']}, probe at layer {data['probe']['layer']}): "
            f"{data['n_items']} held-out questions, each with a conflicting and a consistent "
            f"context, {data['n_shots']} {data['demo_type']} demonstrations, seeds "
            f"{data['seeds']}, mean ± std over seeds (%). The probe flags "
            f"{pe['flagged_conflict']:.1f} % of conflict rows and "
            f"{pe['flagged_no_conflict']:.1f} % of no-conflict rows (AUROC "
            f"{pe['auroc']:.3f}). No-conflict accuracy (EM_M) changes by "
            f"{-ch['no_conflict_accuracy_drop_conditional']:+.1f} points under conditional "
            f"steering ({-ch['no_conflict_accuracy_drop_always']:+.1f} when always steering); "
            f"{ch['target_metric_on_conflict_rows']} on conflict rows changes by "
            f"{ch['conflict_gain_conditional']:+.1f} (conditional) and "
            f"{ch['conflict_gain_always']:+.1f} (always).",
        ]
    return "\n".join(lines)


def _fresh_json(directory: Path, config: Mapping[str, Any], name: str) -> Any | None:
    if cache.is_fresh(directory, config) and (directory / name).exists():
        return cache.read_json(directory / name)
    return None


def run_probe_study(
    model,
    features: FunctionalFeatures,
    saes: Mapping[int, Any],
    pool: Sequence[ConflictItem],
    evaluation: Sequence[ConflictItem],
    *,
    layers: Sequence[int],
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    test_fraction: float = 0.25,
    n_shots: int = 3,
    demo_type: str = "doo",
    demo_seed: int = 0,
    n_demo_sets: int = 1,
    probe_layer: int | None = None,
    threshold: float = 0.5,
    top_n: int = 20,
    conditional: bool = True,
    n_items: int = 100,
    probe_items: int = 0,
    eval_seeds: Sequence[int] = (0, 1, 2),
    direction: Literal["memory", "context"] = "memory",
    batch_size: int = 16,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ProbeStudy:
    """The whole study: probe data from the pool (development) questions (plus ``probe_items``), residual and SAE
    probes per layer, the deployed probe (best residual layer ≤ the first edited layer,
    refitted on every probe question), conflict latents at the feature layers, and
    conditional steering on held-out questions. Stages are cached under
    ``cache_data/<model>/probes/``.

    ``probe_items`` adds that many held-out questions to the probe data, taken from the
    *end* of ``evaluation``; the conditional-steering items are its first ``n_items``, and
    the two never overlap (demonstrations always come from the pool).
    """
    directory = cache.stage_dir(model.cfg.model_name, STAGE, cache_root)
    layers = check_layers(model, layers)
    if probe_items < 0:
        raise ValueError(f"probe_items must be >= 0, got {probe_items}")
    if probe_items and n_items + probe_items > len(evaluation):
        raise ValueError(
            f"{n_items} conditional-steering items + {probe_items} probe items exceed the "
            f"{len(evaluation)} held-out questions; lower --probe-items or --n-items"
        )
    probe_questions = list(pool) + (list(evaluation[-probe_items:]) if probe_items else [])
    first_edit = features.last_probe_layer(direction)
    sae_layers = sorted(k for k in saes if k in layers)
    dataset = build_probe_dataset(
        model,
        probe_questions,
        pool,
        layers,
        n_shots=n_shots,
        demo_type=demo_type,
        seed=demo_seed,
        n_demo_sets=n_demo_sets,
        saes={k: saes[k] for k in sae_layers},
        batch_size=batch_size,
        cache_root=cache_root,
        use_cache=use_cache,
        progress=progress,
    )
    train_cfg = {"dataset": cache.fingerprint(dataset.config), "seeds": list(seeds)}
    train_cfg |= {"test_fraction": test_fraction, "Cs": list(DEFAULT_CS)}
    results: dict[str, ProbeResults | None] = {}
    for kind in ("resid", "sae"):
        if kind == "sae" and not dataset.sae_layers:
            results[kind] = None
            continue
        sub = directory / kind
        config = {"stage": f"{STAGE}/{kind}", **train_cfg}
        cached = _fresh_json(sub, config, "results.json") if use_cache else None
        if cached is not None:
            results[kind] = ProbeResults.from_json(cached)
            continue
        res = train_probes(
            dataset, seeds=seeds, test_fraction=test_fraction, features=kind, progress=progress
        )  # type: ignore[arg-type]
        cache.begin_stage(sub)
        res.save(sub / "results.json")
        cache.mark_complete(sub, config)
        results[kind] = res
    resid_results = results["resid"]
    assert resid_results is not None
    if probe_layer is None:
        probe_layer = resid_results.best_layer(max_layer=first_edit)
    if probe_layer > first_edit:
        raise ValueError(
            f"probe layer {probe_layer} is after the first edited layer {first_edit}: "
            "conditional steering must decide before it edits"
        )
    probe = fit_conflict_probe(dataset, probe_layer, threshold=threshold, seed=0)
    probe.save(directory / "conflict_probe")
    logger.info("conflict probe at layer %d (C %s)", probe.layer, probe.C)

    steered = features.for_direction(direction)  # the set conditional steering uses
    latents = {
        layer: conflict_latents(dataset, layer, steered, top_n=top_n)
        for layer in sorted(steered.layers)
        if layer in dataset.sae_layers
    }
    cache.write_json(directory / "latents.json", {str(k): v.to_json() for k, v in latents.items()})

    cond_result = None
    if conditional:
        items = list(evaluation[:n_items])
        cond_cfg = {
            "stage": f"{STAGE}/conditional",
            "model": model.cfg.model_name,
            "items": _items_hash(items),
            "pool": _items_hash(pool),
            "probe": cache.fingerprint(
                {"w": probe.weight.tolist(), "b": probe.bias, "t": probe.threshold}
            ),
            "features": cache.fingerprint(
                {
                    "layers": steered.counts(),
                    "alpha": features.strength(direction),
                    "ids": {
                        k: f.context_features.tolist() + f.memory_features.tolist()
                        for k, f in steered.layers.items()
                    },
                }
            ),
            "seeds": list(eval_seeds),
            "direction": direction,
            "n_shots": n_shots,
            "demo_type": demo_type,
        }
        sub = directory / "conditional"
        cached = _fresh_json(sub, cond_cfg, "results.json") if use_cache else None
        if cached is not None:
            cond_result = ConditionalResult(summary=cached)
        else:
            cond_result = evaluate_conditional(
                model,
                features,
                saes,
                probe,
                items,
                pool,
                direction=direction,
                seeds=eval_seeds,
                n_shots=n_shots,
                demo_type=demo_type,
                batch_size=batch_size,
                progress=progress,
            )
            cache.begin_stage(sub)
            cond_result.save(sub / "results.json", sub / "predictions.jsonl")
            cache.mark_complete(sub, cond_cfg)
    return ProbeStudy(
        dataset=dataset,
        resid=resid_results,
        sae=results["sae"],
        probe=probe,
        latents=latents,
        conditional=cond_result,
        directory=directory,
    )


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _available_sae_layers(saes_dir: Path) -> list[int]:
    from spare_tl.saes import CFG, folder_site, sae_layer_from_folder

    root = Path(saes_dir)
    if not root.is_dir():
        return []
    return sorted(
        sae_layer_from_folder(p)
        for p in root.iterdir()
        if (p / CFG).exists() and folder_site(p) == "resid_post"
    )


def _run(args: argparse.Namespace) -> int:
    from spare_tl.embedded import memorised_split
    from spare_tl.saes import load_saes_for_layers

    torch.set_grad_enabled(False)
    start = time.time()
    layers = parse_layers(args.layers)
    model, features, saes = load_steering_setup_for(args.features, args.saes, args.dtype)
    have = [k for k in _available_sae_layers(Path(args.saes)) if k in layers]
    saes = {**load_saes_for_layers(model, args.saes, have), **saes}
    split = memorised_split(model, features, args.dataset, progress=not args.quiet)
    study = run_probe_study(
        model,
        features,
        saes,
        split.pool,
        split.evaluation,
        layers=layers,
        seeds=args.seeds,
        test_fraction=args.test_fraction,
        n_shots=args.n_shots,
        demo_type=args.demo_type,
        n_demo_sets=args.n_demo_sets,
        probe_layer=args.probe_layer,
        threshold=args.threshold,
        top_n=args.top_n,
        conditional=not args.no_conditional,
        n_items=args.n_items,
        probe_items=args.probe_items,
        eval_seeds=args.eval_seeds,
        direction=args.direction,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    table = study.table()
    layer_text = " ".join(args.layers)
    table += (
        f"\nRegenerate: `python -m spare_tl.probes run --layers {layer_text} --seeds "
        f"{' '.join(map(str, args.seeds))} --n-items {args.n_items} "
        f"--probe-items {args.probe_items} --eval-seeds "
        f"{' '.join(map(str, args.eval_seeds))}` ({time.time() - start:.0f} s on the 2-core CPU)."
    )
    (study.directory / "probes.md").write_text(table + "\n")
    if args.figure:
        from spare_tl.viz.figures_probes import probe_quality_by_layer

        probe_quality_by_layer(study.resid, study.sae).write_html(args.figure)
    print(table)
    print("docs/results.md is regenerated from the saved JSON by `spare-tl docs`")
    return 0


def main(argv: list[str] | None = None) -> int:
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES

    parser = argparse.ArgumentParser(prog="python -m spare_tl.probes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole probe study on the embedded default")
    run.add_argument("--layers", nargs="+", default=["6-20"], help="e.g. 6-20 or 6 8 10-12")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run.add_argument("--test-fraction", type=float, default=0.25)
    run.add_argument("--n-shots", type=int, default=3)
    run.add_argument("--demo-type", default="doo", choices=["doo", "dss", "dso"])
    run.add_argument("--n-demo-sets", type=int, default=1)
    run.add_argument("--probe-layer", type=int, default=None)
    run.add_argument("--threshold", type=float, default=0.5)
    run.add_argument("--top-n", type=int, default=20)
    run.add_argument("--n-items", type=int, default=100)
    run.add_argument(
        "--probe-items",
        type=int,
        default=0,
        help="held-out questions (from the end of the held-out list) added to the probe data",
    )
    run.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--direction", default="memory", choices=["memory", "context"])
    run.add_argument("--no-conditional", action="store_true")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--dataset", default="builtin")
    run.add_argument("--features", default=str(DEFAULT_FEATURES))
    run.add_argument("--saes", default=str(DEFAULT_SAES))
    run.add_argument("--figure", default=None, help="also write the figure as HTML here")
    run.add_argument("--no-readme", action="store_true", help=argparse.SUPPRESS)  # old flag
    add_dtype_argument(run)
    run.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
