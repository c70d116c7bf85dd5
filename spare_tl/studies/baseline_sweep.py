"""A baseline's development sweep and its evaluation, both through the one harness.

:func:`sweep_method` scores candidate settings of one method in each direction on development
questions with the test protocol (:func:`spare_tl.stages.sweep.answer_settings`, as SpARE's
own sweep); :func:`save_method_sweep` writes ``cache_data/<model>/baselines/sweep-<method>.json``
with the dev-best setting per direction, which :func:`best_hyperparameters` reads back.
:func:`evaluate_method` is :func:`spare_tl.stages.evaluation.evaluate` with a method.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

from spare_tl import cache
from spare_tl.data.schema import ConflictItem
from spare_tl.generation import Decoding, DecodingOptions
from spare_tl.methods.base import SteeringMethod
from spare_tl.methods.hooks import DIRECTIONS
from spare_tl.stages.evaluation import (
    EvaluationConfig,
    EvaluationResult,
    evaluate,
    evaluation_questions,
)
from spare_tl.stages.sweep import MAX_NEITHER_RISE, answer_settings, best_settings

__all__ = [
    "STAGE",
    "best_hyperparameters",
    "evaluate_method",
    "save_method_sweep",
    "sweep_method",
    "sweep_path",
]

logger = logging.getLogger(__name__)

STAGE = "baselines"


def evaluate_method(
    model,
    method: SteeringMethod,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    config: EvaluationConfig | None = None,
    dataset_name: str = "builtin",
    progress: bool = True,
    shared_no_steering: dict[int, tuple[list[str], float]] | None = None,
) -> EvaluationResult:
    """:func:`spare_tl.stages.evaluation.evaluate` with ``method`` (the one evaluation harness)."""
    return evaluate(
        model,
        items,
        pool,
        method=method,
        config=config,
        dataset_name=dataset_name,
        progress=progress,
        shared_no_steering=shared_no_steering,
    )


def sweep_method(
    model,
    candidates: Sequence[SteeringMethod],
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    directions: Sequence[str] = DIRECTIONS,
    n_shots: int = 3,
    seed: int = 0,
    demo_type: str = "doo",
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> list[dict[str, Any]]:
    """EM of every candidate setting in each direction on the development ``items`` with the
    test protocol (demonstrations from ``pool``), as :func:`spare_tl.stages.sweep.sweep`: every
    (candidate, direction) is a condition of the one harness
    (:func:`spare_tl.stages.sweep.answer_settings`); the first record is no steering. Test
    questions are never looked at."""
    if not candidates:
        raise ValueError("no candidate settings to sweep")
    if not items:
        raise ValueError("the sweep needs at least one development question")
    names = {c.name for c in candidates}
    if len(names) != 1:
        raise ValueError(f"sweep one method at a time, got {sorted(names)}")
    name = names.pop()
    grid = [(c, d) for c in candidates for d in directions]
    questions = evaluation_questions(items, pool, n_shots, seed, demo_type)
    dec = Decoding.of(decoding, options, desc=f"sweep {name}")
    none, *shares = answer_settings(model, questions, grid, decoding=dec)
    records: list[dict[str, Any]] = [
        {"method": name, "direction": "none", "hyperparameters": {}, "n": len(items)} | none
    ]
    for (candidate, direction), share in zip(grid, shares):
        rec = {
            "method": name,
            "direction": direction,
            "hyperparameters": candidate.hyperparameters(direction),
            "n": len(items),
        } | share
        logger.info("sweep %s", rec)
        records.append(rec)
    return records


def sweep_path(model_name: str, method: str, root: Path | None = None) -> Path:
    return cache.stage_dir(model_name, STAGE, root) / f"sweep-{method}.json"


def save_method_sweep(
    records: Sequence[dict[str, Any]], path: Path, config: dict[str, Any]
) -> None:
    """``{"config", "records", "best"}``; best: per direction, highest EM in that direction
    among the settings breaking at most ``config["max_neither_rise"]`` (default
    :data:`spare_tl.stages.sweep.MAX_NEITHER_RISE`, as SpARE's sweep) more answers than no
    steering, then fewest broken answers (:func:`spare_tl.stages.sweep.best_settings`)."""
    config = {"max_neither_rise": MAX_NEITHER_RISE, **config}
    best = best_settings(records, config["max_neither_rise"])
    cache.write_json(Path(path), {"config": config, "records": list(records), "best": best})


def best_hyperparameters(path: Path) -> dict[str, dict[str, Any]]:
    """Dev-best hyper-parameters per direction from a saved sweep."""
    path = Path(path)
    if not path.exists():
        method = path.stem.removeprefix("sweep-")
        raise FileNotFoundError(
            f"no development sweep at {path}: run `spare-tl baselines sweep --method {method}` "
            "first (or pass the hyper-parameters)"
        )
    best = cache.read_json(path)["best"]
    return {d: best[d]["hyperparameters"] for d in DIRECTIONS if d in best}
