"""Stages split across ``torchrun`` ranks: the held-out evaluation (one seed per work unit),
the memorised set (one unit per shared demonstration prefix) and the steerability scan (one
unit per layer, plus the unpatched answers).

:func:`evaluate_sharded` runs :func:`spare_tl.stages.evaluation.evaluate` on each rank's
seeds and merges the per-seed results with :func:`~spare_tl.stages.evaluation.summarise`
into the result one process gives (the same predictions and scores; the timing fields are
sums over ranks). A seed's items are batched exactly as in one process, so every answer is
the same. The stage folder holds ``summary.json`` and ``predictions.jsonl`` (identical
bytes whatever the number of ranks) and ``timing.json``, sealed by rank 0
(:func:`spare_tl.distributed.run_sharded`); an interrupted run resumes from the seeds its
ranks finished.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spare_tl import cache, distributed
from spare_tl.data.schema import ConflictItem, items_hash
from spare_tl.features import FunctionalFeatures
from spare_tl.generation import Decoding
from spare_tl.methods.base import NoSteering, SteeringMethod
from spare_tl.methods.spare import DIRECTIONS, SpareMethod
from spare_tl.stages.evaluation import (
    CONDITION_OF,
    EvaluationConfig,
    EvaluationResult,
    evaluate,
    features_summary,
    summarise,
)
from spare_tl.stages.memorised import (
    MemorisedSet,
    answer_unit,
    closed_book_units,
    memorised_config,
    memorised_dir,
    memorised_from_answers,
)
from spare_tl.stages.scan import ScanConfig, ScanPlan, ScanResult, scan_dir, scan_key, scan_unit

TIMING = ("seconds_per_item", "shared_prefix_seconds_per_item", "time_relative_to_no_steering")
#: fields of a summary that describe the run, not the answers: they go to timing.json
RUN = ("seconds", "machine")
HEAD = ("model", "dataset", "n_items", "seeds", "demo_type")


def evaluation_stage_config(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    method: SteeringMethod,
    config: EvaluationConfig,
    dataset_name: str,
    shared_prefix: bool,
) -> dict[str, Any]:
    """What an evaluation's results depend on (the stage's fingerprint)."""
    directions = [d for d in DIRECTIONS if CONDITION_OF[d] in config.conditions]
    features = getattr(method, "features", None)
    return {
        "stage": "evaluation",
        "model": model.cfg.model_name,
        "dataset": dataset_name,
        "items": items_hash(items),
        "n_items": len(items),
        "pool": items_hash(pool),
        "evaluation": asdict(config),
        "method": method.name,
        "hyperparameters": (
            {} if method.name == "none" else {d: method.hyperparameters(d) for d in directions}
        ),
        "features": features_summary(features) if features is not None else None,
        "shared_prefix": shared_prefix,
    }


def merge_evaluations(
    parts: Sequence[Mapping[str, Any]], items: Sequence[ConflictItem], seeds: Sequence[int]
) -> EvaluationResult:
    """One :class:`EvaluationResult` from per-seed results (``{"summary": to_json(),
    "predictions": [...]}`` of ``evaluate`` with one seed each), in ``seeds`` order.

    The first seed's summary is the template (its keys, their order, the settings); what
    depends on the seeds is recomputed from every seed's predictions as ``evaluate`` does
    (:func:`summarise`, the containment shares) and the times are summed."""
    by_seed = {int(p["summary"]["seeds"][0]): p for p in parts}
    if sorted(by_seed) != sorted(int(s) for s in seeds) or len(parts) != len(seeds):
        raise ValueError(f"per-seed results for seeds {sorted(by_seed)}, expected {list(seeds)}")
    predictions = [rec for s in seeds for rec in by_seed[s]["predictions"]]
    first = by_seed[seeds[0]]["summary"]
    conditions = [k[: -len(".prediction")] for k in predictions[0] if k.endswith(".prediction")]

    def per_seed(field: str, cond: str) -> dict[int, list[str]]:
        return {s: [r[f"{cond}.{field}"] for r in by_seed[s]["predictions"]] for s in seeds}

    summary = {k: v for k, v in first.items() if k not in HEAD}
    summary.update(
        summarise(
            {c: per_seed("label", c) for c in conditions},
            [it.relation for it in items],
            list(seeds),
            {c: per_seed("contains", c) for c in conditions if f"{c}.contains" in predictions[0]},
        )
    )
    summary["method"] = _merge_method(
        [by_seed[s]["summary"]["method"] for s in seeds], conditions, len(items)
    )
    if "seconds" in summary:
        summary["seconds"] = round(sum(by_seed[s]["summary"]["seconds"] for s in seeds), 1)
    return EvaluationResult(
        **{k: first[k] for k in HEAD if k != "seeds"},
        seeds=list(seeds),
        summary=summary,
        predictions=predictions,
    )


def _merge_method(parts: list[dict[str, Any]], conditions: list[str], n_items: int):
    """The method summary of all seeds: settings from the first, times summed over seeds
    (each seed's seconds per item times its ``n_items`` answers)."""
    alone = {c: sum(p["seconds_per_item"][c] * n_items for p in parts) for c in conditions}
    prefix = sum(p["shared_prefix_seconds_per_item"] * n_items for p in parts)
    n = n_items * len(parts)
    base = max(alone["no_steering"], 1e-9)
    out = {k: v for k, v in parts[0].items() if k not in TIMING}
    out["seconds_per_item"] = {c: alone[c] / n for c in conditions}
    out["shared_prefix_seconds_per_item"] = prefix / n
    out["time_relative_to_no_steering"] = {c: alone[c] / base for c in conditions}
    return out


def _stage_files(result: EvaluationResult) -> dict[str, Any]:
    """``summary.json`` without the fields that describe the run (times, machine),
    ``timing.json`` with them, and the predictions."""
    summary = result.to_json()
    method = dict(summary["method"])
    timing = {k: method.pop(k) for k in TIMING}
    timing.update({k: summary.pop(k) for k in RUN if k in summary})
    summary["method"] = method
    return {
        "summary.json": lambda p: cache.write_json(p, summary),
        "timing.json": lambda p: cache.write_json(p, timing),
        "predictions.jsonl": lambda p: cache.write_jsonl(p, result.predictions),
    }


def load_evaluation(directory: Path) -> EvaluationResult:
    """The sealed evaluation stage at ``directory`` (verified against its manifest)."""
    cache.verify_stage(directory)
    summary = cache.read_json(Path(directory) / "summary.json")
    timing = cache.read_json(Path(directory) / "timing.json")
    summary["method"].update({k: timing[k] for k in TIMING})
    summary.update({k: timing[k] for k in RUN if k in timing})
    head = {k: summary.pop(k) for k in HEAD}
    return EvaluationResult(
        **head, summary=summary, predictions=cache.read_jsonl(Path(directory) / "predictions.jsonl")
    )


def evaluate_sharded(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    directory: Path,
    *,
    features: FunctionalFeatures | None = None,
    saes: Mapping[int, Any] | None = None,
    method: SteeringMethod | None = None,
    config: EvaluationConfig | None = None,
    dataset_name: str = "builtin",
    progress: bool = True,
    shared_prefix: bool = True,
) -> EvaluationResult:
    """:func:`~spare_tl.stages.evaluation.evaluate` with the seeds split across ranks.

    Every rank calls it with its own replica of the model (launched by ``torchrun``; one
    process is a world of one). Rank 0 merges the seeds, seals the stage at ``directory``
    and every rank returns the merged result (read back from the sealed stage). A stage
    sealed by the same settings is read, not recomputed.
    """
    config = config or EvaluationConfig()
    if method is None:
        method = SpareMethod(features, saes) if features is not None else NoSteering()
    stage_config = evaluation_stage_config(
        model, items, pool, method, config, dataset_name, shared_prefix
    )
    seeds = list(config.seeds)

    def compute(key: str) -> dict[str, Any]:
        seed = int(key.removeprefix("seed-"))
        result = evaluate(
            model,
            items,
            pool,
            method=method,
            config=EvaluationConfig(**{**asdict(config), "seeds": (seed,)}),
            dataset_name=dataset_name,
            progress=progress,
            shared_prefix=shared_prefix,
        )
        return {"summary": result.to_json(), "predictions": result.predictions}

    def merge(parts: list[Any]) -> dict[str, Any]:
        return _stage_files(merge_evaluations(parts, items, seeds))

    distributed.run_sharded(directory, stage_config, [f"seed-{s}" for s in seeds], compute, merge)
    return load_evaluation(directory)


def find_memorised_sharded(
    model,
    items: list[ConflictItem],
    *,
    dataset_name: str = "builtin",
    n_shots: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    min_shared: int = 8,
    cache_root: Path | None = None,
) -> MemorisedSet:
    """:func:`~spare_tl.stages.memorised.find_memorised` with its units (one per shared
    demonstration prefix, plus the full-prompt rest) split across ranks; the stage folder
    and its files are the ones one process writes, byte for byte."""
    if not items:
        raise ValueError(f"dataset {dataset_name!r} holds no items")
    config = memorised_config(model, items, dataset_name, n_shots, seed, max_new_tokens)
    directory = memorised_dir(model, items, dataset_name, cache_root)
    demos, units = closed_book_units(items, n_shots, seed, min_shared)
    decoding = Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    keys = [f"{k:05d}" for k in range(len(units))]

    def compute(key: str) -> list[str]:
        return answer_unit(model, items, demos, units[int(key)], min_shared, decoding)

    def merge(parts: list[Any]) -> dict[str, Any]:
        answers = [""] * len(items)
        for unit, outs in zip(units, parts):
            for i, out in zip(unit, outs):
                answers[i] = out
        return memorised_from_answers(model, items, answers, dataset_name, config).stage_files()

    distributed.run_sharded(directory, config, keys, compute, merge)
    return MemorisedSet.load(directory)


def scan_sharded(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    config: ScanConfig | None = None,
    *,
    root: Path | None = None,
    progress: bool = True,
) -> ScanResult:
    """:func:`~spare_tl.stages.scan.cached_scan` with its units (no patch; each layer's
    patches) split across ranks. Each rank answers its units from its own prompt passes;
    rank 0 merges them into the scan one process saves (same stage key, so either run's
    result is reused by the other) and every rank returns it."""
    config = config or ScanConfig()
    plan = ScanPlan.of(model, items, pool, config, progress)
    directory = scan_dir(model.cfg.model_name, root)
    started = time.perf_counter()

    def compute(key: str) -> dict[str, Any]:
        return scan_unit(model, plan, key)

    def merge(parts: list[Any]) -> dict[str, Any]:
        answered = {name: a for part in parts for name, a in part["answers"].items()}
        result = plan.result(model, answered, parts[0]["donors"])
        result.seconds = round(time.perf_counter() - started, 1)
        return {"scan.json": lambda path: cache.write_json(path, result.to_json())}

    key = scan_key(model, items, pool, config)
    distributed.run_sharded(directory, key, plan.units(), compute, merge)
    return ScanResult.load(directory)
