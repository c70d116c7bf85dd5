"""Stage 6: evaluation by the paper's protocol, in both steering directions.

For each demonstration seed, every evaluation item (memorised, never in the pool) gets
``n_shots`` demonstrations of one type (default ``doo``) from the pool, and is answered
greedily (≤ 12 tokens, cut at the newline) without steering, steered to context and
steered to memory. Reported: EM_C and EM_M (percent, mean ± std over seeds) per condition,
the transitions EM_C→M, EM_M→C, EM_C→C, EM_M→M, a per-relation breakdown, and every
prediction.
"""

from __future__ import annotations

import logging
import statistics as st
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.data.prompts import conflict_prompt, sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.features import FunctionalFeatures
from spare_tl.generation import greedy_generate

logger = logging.getLogger(__name__)

CONDITIONS = ("no_steering", "steer_to_context", "steer_to_memory")


@dataclass(frozen=True)
class EvaluationConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_shots: int = 3
    demo_type: str = "doo"
    max_new_tokens: int = 12
    batch_size: int = 16
    conditions: tuple[str, ...] = CONDITIONS


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": float(st.fmean(values)) if values else float("nan"),
        "std": float(st.pstdev(values)) if len(values) > 1 else 0.0,
    }


def _share(labels: Sequence[str], which: str) -> float:
    return 100.0 * sum(label == which for label in labels) / max(len(labels), 1)


def _transition(base: Sequence[str], steered: Sequence[str], src: str, dst: str) -> float | None:
    idx = [i for i, b in enumerate(base) if b == src]
    if not idx:
        return None
    return 100.0 * sum(steered[i] == dst for i in idx) / len(idx)


@dataclass
class EvaluationResult:
    """Scores per condition and seed, plus every prediction."""

    model: str
    dataset: str
    n_items: int
    seeds: list[int]
    demo_type: str
    summary: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "n_items": self.n_items,
            "seeds": self.seeds,
            "demo_type": self.demo_type,
            **self.summary,
        }

    def save(self, path: Path, predictions_path: Path | None = None) -> None:
        cache.write_json(path, self.to_json())
        if predictions_path is not None:
            cache.write_jsonl(predictions_path, self.predictions)


def summarise(
    labels: Mapping[str, Mapping[int, list[str]]],
    relations: Sequence[str],
    seeds: Sequence[int],
) -> dict[str, Any]:
    """EM_C / EM_M / neither per condition (mean ± std over seeds), transitions, relations."""
    out: dict[str, Any] = {}
    for cond, per_seed in labels.items():
        em_c = [_share(per_seed[s], "context") for s in seeds]
        em_m = [_share(per_seed[s], "memory") for s in seeds]
        neither = [_share(per_seed[s], "neither") for s in seeds]
        out[cond] = {
            "EM_C": _mean_std(em_c)["mean"],
            "EM_M": _mean_std(em_m)["mean"],
            "EM_C_std": _mean_std(em_c)["std"],
            "EM_M_std": _mean_std(em_m)["std"],
            "neither": _mean_std(neither)["mean"],
            "per_seed": {"EM_C": em_c, "EM_M": em_m, "neither": neither},
        }
    if "no_steering" in labels:
        base = labels["no_steering"]
        trans: dict[str, dict[str, float]] = {}
        pairs = {
            "EM_C->M": ("steer_to_memory", "context", "memory"),
            "EM_M->M": ("steer_to_memory", "memory", "memory"),
            "EM_M->C": ("steer_to_context", "memory", "context"),
            "EM_C->C": ("steer_to_context", "context", "context"),
        }
        for name, (cond, src, dst) in pairs.items():
            if cond not in labels:
                continue
            vals = [_transition(base[s], labels[cond][s], src, dst) for s in seeds]
            vals = [v for v in vals if v is not None]
            if vals:
                trans[name] = _mean_std(vals)
        out["transitions"] = trans
    per_rel: dict[str, dict[str, dict[str, float]]] = {}
    for rel in sorted(set(relations)):
        idx = [i for i, r in enumerate(relations) if r == rel]
        per_rel[rel] = {}
        for cond, per_seed in labels.items():
            sel = [per_seed[s][i] for s in seeds for i in idx]
            per_rel[rel][cond] = {
                "n": len(idx),
                "EM_C": _share(sel, "context"),
                "EM_M": _share(sel, "memory"),
            }
    out["per_relation"] = per_rel
    return out


def check_held_out(items: Sequence[ConflictItem], pool: Sequence[ConflictItem]) -> None:
    """Refuse an empty evaluation set or one that shares a question with the pool."""
    if not items:
        raise ValueError("no evaluation items: is the memorised set empty?")
    pool_q = {" ".join(p.question.lower().split()) for p in pool}
    leaked = [it.question for it in items if " ".join(it.question.lower().split()) in pool_q]
    if leaked:
        raise ValueError(f"{len(leaked)} evaluation item(s) are pool questions, e.g. {leaked[0]!r}")


def evaluation_demonstrations(
    items: Sequence[ConflictItem], pool: Sequence[ConflictItem], n_shots: int, seed: int
) -> list[list[ConflictItem]]:
    """The ``n_shots`` pool demonstrations of every item for demonstration seed ``seed``."""
    return [
        sample_demonstrations(pool, n_shots, seed=seed * 1_000_003 + i, exclude=it)
        for i, it in enumerate(items)
    ]


def prediction_records(
    seed: int,
    items: Sequence[ConflictItem],
    answers: Mapping[str, Sequence[str]],
    labels: Mapping[str, Mapping[int, Sequence[str]]],
    conditions: Sequence[str],
) -> list[dict[str, Any]]:
    """One record per item of one seed: the item, each condition's prediction and label."""
    return [
        {
            "seed": seed,
            "question": it.question,
            "relation": it.relation,
            "sub_answer": list(it.sub_answer),
            "org_answer": list(it.org_answer),
            **{f"{c}.prediction": answers[c][i] for c in conditions},
            **{f"{c}.label": labels[c][seed][i] for c in conditions},
        }
        for i, it in enumerate(items)
    ]


def saved_questions(predictions: Path) -> list[str] | None:
    """The questions, in order, of a saved predictions file (its first seed's records)."""
    if not Path(predictions).exists():
        return None
    records = cache.read_jsonl(predictions)
    if not records:
        return []
    first = records[0]["seed"]
    return [r["question"] for r in records if r["seed"] == first]


def features_summary(features: FunctionalFeatures) -> dict[str, Any]:
    """The feature set's settings as stored beside evaluation results (with ``to_memory``,
    the memory set's own, when the directions have separate sets)."""
    out = {
        "layers": sorted(features.layers),
        "proportion": features.proportion,
        "edit_strength": features.edit_strength,
        "edit_strength_to_memory": features.edit_strength_to_memory,
        "latent_code": features.latent_code,
        "counts": {str(k): list(v) for k, v in features.counts().items()},
    }
    if features.to_memory is not None:
        out["to_memory"] = features_summary(features.to_memory)
    return out


def evaluate(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    features: FunctionalFeatures | None = None,
    saes: Mapping[int, Any] | None = None,
    config: EvaluationConfig | None = None,
    dataset_name: str = "builtin",
    steer_fn: Callable[[str], AbstractContextManager[Any]] | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate no steering and SpARE steering both ways on ``items``.

    ``steer_fn(direction)`` may replace SpARE's ``steer`` (used by baselines); by default the
    edit is SpARE's with ``features`` and ``saes``.
    """
    from spare_tl.steering import steer

    config = config or EvaluationConfig()
    check_held_out(items, pool)
    needs_steering = any(c != "no_steering" for c in config.conditions)
    if needs_steering and steer_fn is None and (features is None or saes is None):
        raise ValueError("steering conditions need functional features and their SAEs")

    def context_for(cond: str):
        if cond == "no_steering":
            return nullcontext()
        direction = "context" if cond == "steer_to_context" else "memory"
        if steer_fn is not None:
            return steer_fn(direction)
        return steer(model, features, direction, saes)

    labels: dict[str, dict[int, list[str]]] = {c: {} for c in config.conditions}
    predictions: list[dict[str, Any]] = []
    for seed in config.seeds:
        demos = evaluation_demonstrations(items, pool, config.n_shots, seed)
        prompts = [conflict_prompt(it, d, config.demo_type) for it, d in zip(items, demos)]
        answers: dict[str, list[str]] = {}
        for cond in config.conditions:
            with context_for(cond):
                answers[cond] = greedy_generate(
                    model,
                    prompts,
                    max_new_tokens=config.max_new_tokens,
                    batch_size=config.batch_size,
                    progress=progress,
                    desc=f"seed {seed}: {cond}",
                )
            labels[cond][seed] = [behaviour_label(a, it) for a, it in zip(answers[cond], items)]
        predictions += prediction_records(seed, items, answers, labels, config.conditions)
    summary = summarise(labels, [it.relation for it in items], list(config.seeds))
    if features is not None:
        summary["features"] = features_summary(features)
    return EvaluationResult(
        model=model.cfg.model_name,
        dataset=dataset_name,
        n_items=len(items),
        seeds=list(config.seeds),
        demo_type=config.demo_type,
        summary=summary,
        predictions=predictions,
    )
