"""The evaluation stage: evaluation by the paper's protocol, in both steering directions.

For each demonstration seed, every evaluation item (memorised, never in the pool) gets
``n_shots`` demonstrations of one type (default ``doo``) from the pool, and is answered
greedily (≤ 12 tokens, cut at the newline) without steering, steered to context and
steered to memory, through the one harness (:func:`spare_tl.stages.harness.answer_conditions`).
Reported: EM_C, EM_M and neither (percent, mean ± std over seeds) per condition, each with a
95 % bootstrap interval over questions and, for the steered conditions, a paired test against
no steering (:mod:`spare_tl.stats`); the transitions EM_C→M, EM_M→C, EM_C→C, EM_M→M, a
per-relation breakdown, and every prediction.
"""

from __future__ import annotations

import logging
import statistics as st
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.data.prompts import (
    Questions,
    question_key,
    relation_histogram,
    sample_demonstrations,
)
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label, containment_label
from spare_tl.features import FunctionalFeatures
from spare_tl.generation import Decoding, newline_token_ids
from spare_tl.hardware import describe
from spare_tl.methods.base import NoSteering, SteeringMethod
from spare_tl.methods.spare import DIRECTIONS, SpareMethod
from spare_tl.stages.harness import Condition, answer_conditions
from spare_tl.stats import condition_intervals

logger = logging.getLogger(__name__)

CONDITIONS = ("no_steering", "steer_to_context", "steer_to_memory")
CONDITION_OF = {None: "no_steering", "context": "steer_to_context", "memory": "steer_to_memory"}


@dataclass(frozen=True)
class EvaluationConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_shots: int = 3
    demo_type: str = "doo"
    max_new_tokens: int = 12
    batch_size: int = 16
    conditions: tuple[str, ...] = CONDITIONS
    demonstrations: str = "per_seed"

    def __post_init__(self) -> None:
        _check_sampling(self.demonstrations)

    def decoding(self, progress: bool = True, desc: str = "evaluating") -> Decoding:
        """The greedy decoding this configuration asks for."""
        return Decoding(
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            progress=progress,
            desc=desc,
        )


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
    contained: Mapping[str, Mapping[int, list[str]]] | None = None,
) -> dict[str, Any]:
    """EM_C / EM_M / neither per condition (mean ± std over seeds), transitions, relations;
    with ``contained`` (containment labels per condition and seed), the shares of answers
    that contain C and M (``contains_C``, ``contains_M``)."""
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
            "intervals": condition_intervals(
                [per_seed[s] for s in seeds],
                None
                if cond == "no_steering" or "no_steering" not in labels
                else [labels["no_steering"][s] for s in seeds],
            ),
        }
    for cond, per_seed in (contained or {}).items():
        for behaviour, key in (("context", "contains_C"), ("memory", "contains_M")):
            out[cond][key] = _mean_std([_share(per_seed[s], behaviour) for s in seeds])["mean"]
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


DEVELOPMENT_SIZE = 128
#: How demonstrations are drawn: ``per_seed`` (the paper's protocol: one set of k pool
#: demonstrations per seed, the same text before every question) or ``per_item`` (each
#: question its own k, seeded by seed and position).
DEMONSTRATION_SAMPLING = ("per_seed", "per_item")


def development_items(
    development: Sequence[ConflictItem], n: int = DEVELOPMENT_SIZE
) -> list[ConflictItem]:
    """The first ``n`` development questions (``PoolSplit.development``): disjoint from the
    pool and the test questions, spread over the relations in proportion
    (:func:`~spare_tl.data.prompts.split_pool`). The scan, the SpARE sweep and the baselines'
    sweeps all tune on these."""
    if n < 1:
        raise ValueError(f"the development set needs at least 1 question, got n={n}")
    if n > len(development):
        raise ValueError(
            f"asked for {n} development questions, but the split holds {len(development)}; "
            "ask for fewer"
        )
    return list(development[:n])


def _check_sampling(sampling: str) -> None:
    if sampling not in DEMONSTRATION_SAMPLING:
        raise ValueError(
            f"unknown demonstration sampling {sampling!r}: use one of {DEMONSTRATION_SAMPLING}"
        )


def evaluation_demonstrations(
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    n_shots: int,
    seed: int,
    sampling: str = "per_seed",
) -> list[list[ConflictItem]]:
    """The ``n_shots`` pool demonstrations of every item for demonstration seed ``seed``.

    ``per_seed`` draws one set for the seed and shows it before every item (an item that is
    itself in that set, which a held-out item never is, gets its own draw); ``per_item``
    draws each item's set on its own."""
    _check_sampling(sampling)
    if sampling == "per_item":
        return [
            sample_demonstrations(pool, n_shots, seed=seed * 1_000_003 + i, exclude=it)
            for i, it in enumerate(items)
        ]
    shared = sample_demonstrations(pool, n_shots, seed=seed)
    keys = {question_key(d) for d in shared}
    return [
        list(shared)
        if question_key(it) not in keys
        else sample_demonstrations(pool, n_shots, seed=seed * 1_000_003 + i, exclude=it)
        for i, it in enumerate(items)
    ]


def evaluation_questions(
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    n_shots: int,
    seed: int,
    demo_type: str = "doo",
    sampling: str = "per_seed",
) -> Questions:
    """``items`` with their :func:`evaluation_demonstrations`, shown as ``demo_type``."""
    return Questions(
        items, evaluation_demonstrations(items, pool, n_shots, seed, sampling), demo_type
    )


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


def _method_summary(
    method: SteeringMethod,
    conditions: Sequence[str],
    seconds: Mapping[str, float],
    n_answers: int,
) -> dict[str, Any]:
    """The method's settings and measured cost. ``seconds`` holds what each condition would
    cost on its own (its shared prompt pass, when it shares one, plus its own last-token pass
    and decoding) and ``"prefix"``, the shared prompt pass; relative times are against no
    steering's."""
    prefix = seconds.get("prefix", 0.0)
    alone = {c: seconds.get(c, 0.0) for c in conditions}
    base = max(alone["no_steering"], 1e-9)
    return {
        "name": method.name,
        "hyperparameters": {
            d: method.hyperparameters(d) for d in DIRECTIONS if CONDITION_OF[d] in conditions
        },
        "inference_time": method.inference_time,
        "extra_forward_passes_per_token": method.extra_forward_passes_per_token,
        "seconds_per_item": {c: alone[c] / n_answers for c in conditions},
        "shared_prefix_seconds_per_item": prefix / n_answers,
        "time_relative_to_no_steering": {c: alone[c] / base for c in conditions},
    }


def evaluate(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    features: FunctionalFeatures | None = None,
    saes: Mapping[int, Any] | None = None,
    method: SteeringMethod | None = None,
    config: EvaluationConfig | None = None,
    dataset_name: str = "builtin",
    progress: bool = True,
    shared_prefix: bool = True,
    shared_no_steering: dict[int, tuple[list[str], float]] | None = None,
) -> EvaluationResult:
    """Evaluate no steering and a method's steering both ways on ``items``.

    The method is SpARE with ``features`` and ``saes`` unless ``method`` (any
    :class:`~spare_tl.stages.harness.SteeringMethod`: a baseline) is given. Per demonstration seed,
    every condition answers through :func:`~spare_tl.stages.harness.answer_conditions` (one shared
    prompt pass per batch for the methods that edit only the last prompt position).
    The method ``none`` runs only the no-steering condition. ``shared_no_steering``
    (seed -> (answers, seconds)), filled by the first evaluation of a run and reused by the
    next ones on the same items and seeds, saves re-running the no-steering condition.
    """
    config = config or EvaluationConfig()
    if method is None:
        needs_steering = any(c != "no_steering" for c in config.conditions)
        if needs_steering and (features is None or saes is None):
            raise ValueError("steering conditions need functional features and their SAEs")
        method = SpareMethod(features, saes) if features is not None else NoSteering()
    results = evaluate_methods(
        model,
        items,
        pool,
        {method.name: method},
        config=config,
        dataset_name=dataset_name,
        progress=progress,
        shared_prefix=shared_prefix,
        shared_no_steering=shared_no_steering,
    )
    return results[method.name]


def evaluate_methods(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    methods: Mapping[str, SteeringMethod],
    *,
    config: EvaluationConfig | None = None,
    dataset_name: str = "builtin",
    progress: bool = True,
    shared_prefix: bool = True,
    shared_no_steering: dict[int, tuple[list[str], float]] | None = None,
) -> dict[str, EvaluationResult]:
    """:func:`evaluate` for several methods on the same questions, one call per seed.

    No steering answers once, and every method's conditions answer through one
    :func:`~spare_tl.stages.harness.answer_conditions` call per seed: methods that edit only
    the last prompt position of the same prompts (SpARE, ActAdd, task vectors) share one
    prompt pass and decode together. Each method's result is what :func:`evaluate` gives it
    alone (the same answers); its time counts the shared prompt pass as if it ran alone.
    """
    config = config or EvaluationConfig()
    if not methods:
        raise ValueError("give at least one method to evaluate")
    check_held_out(items, pool)
    started = time.perf_counter()
    direction_of = {c: d for d, c in CONDITION_OF.items()}
    steered = [c for c in config.conditions if c != "no_steering"]
    conditions = {
        name: ["no_steering", *(steered if method.name != "none" else [])]
        for name, method in methods.items()
    }
    newline_token_ids(model)  # warm the tokenizer lookup outside the timed region
    labels = {name: {c: {} for c in conds} for name, conds in conditions.items()}
    contained = {name: {c: {} for c in conds} for name, conds in conditions.items()}
    seconds: dict[str, dict[str, float]] = {name: {} for name in methods}
    predictions: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    label = "+".join(m.name for m in methods.values())
    for seed in config.seeds:
        questions = evaluation_questions(
            items, pool, config.n_shots, seed, config.demo_type, config.demonstrations
        )
        reuse = shared_no_steering is not None and seed in shared_no_steering
        todo = [] if reuse else [Condition("no_steering", NoSteering(), None)]
        todo += [
            Condition(f"{name}|{c}", methods[name], direction_of[c])
            for name, conds in conditions.items()
            for c in conds[1:]
        ]
        spent: dict[str, float] = {}
        prefixes: dict[str, float] = {}
        answered = answer_conditions(
            model,
            questions,
            todo,
            shared_prefix=shared_prefix,
            seconds=spent,
            prefix_seconds=prefixes,
            decoding=config.decoding(progress, f"{label} seed {seed}"),
        )
        if reuse:
            assert shared_no_steering is not None
            no_steering, no_steering_seconds = shared_no_steering[seed]
        else:
            no_steering = answered["no_steering"]
            no_steering_seconds = spent["no_steering"] + prefixes.get("no_steering", 0.0)
            if shared_no_steering is not None:
                shared_no_steering[seed] = (list(no_steering), no_steering_seconds)
        for name, conds in conditions.items():
            answers = {"no_steering": no_steering}
            answers |= {c: answered[f"{name}|{c}"] for c in conds[1:]}
            # what each condition would cost alone: its own passes and its prompts' shared pass
            own = {"no_steering": no_steering_seconds}
            own |= {c: spent[f"{name}|{c}"] + prefixes.get(f"{name}|{c}", 0.0) for c in conds[1:]}
            own["prefix"] = max(
                [prefixes.get("no_steering", 0.0)]
                + [prefixes.get(f"{name}|{c}", 0.0) for c in conds[1:]]
            )
            for key, value in own.items():
                seconds[name][key] = seconds[name].get(key, 0.0) + value
            for cond in conds:
                labels[name][cond][seed] = [
                    behaviour_label(a, it) for a, it in zip(answers[cond], items)
                ]
                contained[name][cond][seed] = [
                    containment_label(a, it) for a, it in zip(answers[cond], items)
                ]
            records = prediction_records(seed, items, answers, labels[name], conds)
            for i, record in enumerate(records):
                record.update({f"{c}.contains": contained[name][c][seed][i] for c in conds})
            predictions[name] += records
    elapsed = time.perf_counter() - started
    return {
        name: _result(
            model,
            items,
            config,
            method,
            conditions[name],
            labels[name],
            contained[name],
            seconds[name],
            predictions[name],
            dataset_name=dataset_name,
            shared_prefix=shared_prefix,
            seconds_total=elapsed / len(methods),
        )
        for name, method in methods.items()
    }


def _result(
    model,
    items: Sequence[ConflictItem],
    config: EvaluationConfig,
    method: SteeringMethod,
    conditions: Sequence[str],
    labels: Mapping[str, Mapping[int, list[str]]],
    contained: Mapping[str, Mapping[int, list[str]]],
    seconds: Mapping[str, float],
    predictions: list[dict[str, Any]],
    *,
    dataset_name: str,
    shared_prefix: bool,
    seconds_total: float,
) -> EvaluationResult:
    """One method's :class:`EvaluationResult` from its labels, times and predictions."""
    summary = summarise(labels, [it.relation for it in items], list(config.seeds), contained)
    summary["method"] = _method_summary(method, conditions, seconds, len(items) * len(config.seeds))
    method_features = getattr(method, "features", None)
    if method_features is not None:
        summary["features"] = features_summary(method_features)
    summary["protocol"] = {
        "n_shots": config.n_shots,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "shared_prefix": shared_prefix,
        "demonstrations": config.demonstrations,
    }
    summary["relations"] = relation_histogram(items)
    summary["seconds"] = round(seconds_total, 1)
    summary["machine"] = describe()
    return EvaluationResult(
        model=model.cfg.model_name,
        dataset=dataset_name,
        n_items=len(items),
        seeds=list(config.seeds),
        demo_type=config.demo_type,
        summary=summary,
        predictions=predictions,
    )
