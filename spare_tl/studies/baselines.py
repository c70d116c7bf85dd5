"""Baselines in SpARE's harness: the same prompts, demonstrations, decoding, exact match and
test questions, one interface, hyper-parameters chosen on the development set only.

Methods (``METHODS``), each a :class:`~spare_tl.methods.base.SteeringMethod` that answers
``(items, demonstrations, direction)``: ``none`` (no steering, the ``doo`` prompts of the
evaluation), ``spare`` (SpARE's edit, :func:`spare_tl.methods.spare.steer`, with a saved
feature set), and the baselines ``icl``, ``actadd``, ``taskvec`` and ``cad``
(:mod:`spare_tl.methods.baselines`). What they are built from and the steering vectors:
:mod:`spare_tl.studies.baseline_setup`; the development sweep and the evaluation of one
method: :mod:`spare_tl.studies.baseline_sweep`. This module is the comparison table:
:func:`run_table` evaluates every method on the held-out questions with its dev-best settings
and saves per-method JSON and ``table.json`` (:func:`table_rows`, data only; rendered by
:mod:`spare_tl.viz.tables`).

    spare-tl baselines sweep --method actadd      # dev sweep -> baselines/sweep-actadd.json
    spare-tl baselines table                      # held-out table -> JSON (spare-tl docs)
    spare-tl evaluate --method cad --output cad.json        # one method, dev-best settings
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.hardware import describe
from spare_tl.methods.base import SteeringMethod
from spare_tl.methods.hooks import DIRECTIONS
from spare_tl.stages.evaluation import (
    EvaluationConfig,
    evaluate_methods,
    saved_questions,
)
from spare_tl.studies.baseline_setup import BaselineSetup

__all__ = ["run_table", "table_rows"]

logger = logging.getLogger(__name__)


def table_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method from :meth:`EvaluationResult.to_json` outputs."""
    rows = []
    for name, data in results.items():
        meta = data["method"]
        ctx = data.get("steer_to_context", data["no_steering"])
        mem = data.get("steer_to_memory", data["no_steering"])
        rel = meta["time_relative_to_no_steering"]
        steered = [rel[c] for c in ("steer_to_context", "steer_to_memory") if c in rel]
        rows.append(
            {
                "method": name,
                "EM_C": ctx["EM_C"],
                "EM_C_std": ctx["EM_C_std"],
                "EM_M": mem["EM_M"],
                "EM_M_std": mem["EM_M_std"],
                "neither_to_context": ctx.get("neither"),
                "neither_to_memory": mem.get("neither"),
                "contains_M_to_memory": mem.get("contains_M"),
                # CAD at α = −1 decodes log p(y | x): the closed-book answer
                "memory_is_closed_book": name == "cad"
                and meta["hyperparameters"].get("memory", {}).get("alpha") == -1.0,
                "EM_C->M": data.get("transitions", {}).get("EM_C->M"),
                "EM_M->C": data.get("transitions", {}).get("EM_M->C"),
                "extra_forward_passes_per_token": meta["extra_forward_passes_per_token"],
                "time_relative_to_no_steering": sum(steered) / len(steered) if steered else 1.0,
                "inference_time": meta["inference_time"],
                "hyperparameters": meta["hyperparameters"],
            }
        )
    return rows


def _protocol(config: EvaluationConfig, n_items: int, dataset: str) -> dict[str, Any]:
    return {
        "n_items": n_items,
        "seeds": list(config.seeds),
        "demo_type": config.demo_type,
        "n_shots": config.n_shots,
        "dataset": dataset,
        "demonstrations": config.demonstrations,
    }


def _same_protocol(data: Mapping[str, Any], protocol: Mapping[str, Any]) -> bool:
    return (
        data.get("n_items") == protocol["n_items"]
        and data.get("seeds") == protocol["seeds"]
        and data.get("demo_type") == protocol["demo_type"]
        and data.get("dataset") == protocol["dataset"]
        and data.get("protocol", {}).get("n_shots") == protocol["n_shots"]
    )


def run_table(
    setup: BaselineSetup,
    methods: Sequence[str],
    *,
    config: EvaluationConfig,
    n_items: int | None,
    out_dir: Path,
    reuse: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate every method on the held-out items with its dev-best settings (or, with
    ``reuse``, take saved results of the same protocol and settings), save per-method JSON
    and ``table.json``, return the results by method.

    ``table.json`` holds the model, the protocol, :func:`table_rows` and the table's wall
    time: data only; the table is rendered by :func:`spare_tl.viz.tables.baselines_markdown`
    (Markdown) and the report (HTML)."""
    started = time.perf_counter()
    items = setup.test[:n_items] if n_items else setup.test
    protocol = _protocol(config, len(items), setup.dataset)
    results: dict[str, dict[str, Any]] = {}
    todo: dict[str, SteeringMethod] = {}
    for name in methods:
        path = Path(out_dir) / f"{name}.json"
        method = setup.method(name)
        settings = {} if name == "none" else {d: method.hyperparameters(d) for d in DIRECTIONS}
        if reuse and path.exists():
            saved = cache.read_json(path)
            asked = saved_questions(Path(out_dir) / f"{name}-predictions.jsonl")
            if (
                _same_protocol(saved, protocol)
                and saved["method"]["hyperparameters"] == settings
                and asked == [it.question for it in items]
            ):
                logger.info("%s: reusing %s", name, path)
                results[name] = saved
                continue
        todo[name] = method
    # every method answers through one harness call per seed: conditions of the same prompts
    # share one prompt pass and decode together, and unedited ones (the closed-book row, CAD
    # at α = −1) are answered once
    if todo:
        evaluated = evaluate_methods(
            setup.model,
            items,
            setup.pool,
            todo,
            config=config,
            dataset_name=setup.dataset,
            progress=setup.progress,
        )
        for name, result in evaluated.items():
            result.save(Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}-predictions.jsonl")
            results[name] = result.to_json()
    results = {name: results[name] for name in methods}
    model_name = next(iter(results.values()))["model"]
    cache.write_json(
        Path(out_dir) / "table.json",
        {
            "model": model_name,
            "protocol": protocol,
            "rows": table_rows(results),
            "seconds": round(time.perf_counter() - started, 1),
            "machine": describe(),
        },
    )
    return results
