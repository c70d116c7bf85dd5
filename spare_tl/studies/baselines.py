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
and saves per-method JSON and ``table.json`` (:func:`table_rows`).

    spare-tl baselines sweep --method actadd      # dev sweep -> baselines/sweep-actadd.json
    spare-tl baselines table                      # held-out table -> JSON (spare-tl docs)
    spare-tl evaluate --method cad --output cad.json        # one method, dev-best settings

The names of the modules above stay importable from here (the old ``spare_tl.baselines``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.hardware import describe
from spare_tl.lazy import lazy_getattr
from spare_tl.methods import baselines as baseline_methods
from spare_tl.methods.hooks import DIRECTIONS
from spare_tl.stages.evaluation import EvaluationConfig, saved_questions
from spare_tl.studies.baseline_setup import BaselineSetup
from spare_tl.studies.baseline_sweep import evaluate_method

#: the names of the old ``spare_tl.baselines`` that now live elsewhere, by module; they stay
#: importable from here for one release (resolved on first use by ``__getattr__``)
OLD_NAMES: dict[str, tuple[str, ...]] = {
    "spare_tl.methods.base": ("NoSteering", "PromptMethod", "SteeringMethod"),
    "spare_tl.methods.baselines": tuple(baseline_methods.__all__),
    "spare_tl.methods.spare": ("SpareMethod",),
    "spare_tl.stages.evaluation": ("CONDITION_OF",),
    "spare_tl.studies.baseline_setup": (
        "DEFAULT_ALPHAS",
        "DEFAULT_COEFFICIENTS",
        "METHODS",
        "actadd_vectors",
        "task_vectors",
    ),
    "spare_tl.studies.baseline_sweep": (
        "STAGE",
        "best_hyperparameters",
        "save_method_sweep",
        "sweep_method",
        "sweep_path",
    ),
}
_HOME = {name: module for module, names in OLD_NAMES.items() for name in names}

__all__ = sorted(
    ["BaselineSetup", "baseline_table", "evaluate_method", "run_table", "table_rows", *_HOME]
)


__getattr__ = lazy_getattr(__name__, _HOME)


logger = logging.getLogger(__name__)


def _transition(data: Mapping[str, Any], key: str) -> str:
    t = data.get("transitions", {}).get(key)
    return f"{t['mean']:.1f} ± {t['std']:.1f}" if t else "–"


def _format_hp(hp: Mapping[str, Any]) -> str:
    parts = []
    for k, v in hp.items():
        if k == "layers" and isinstance(v, list) and v == list(range(v[0], v[-1] + 1)):
            v = f"{v[0]}-{v[-1]}" if len(v) > 1 else str(v[0])
        parts.append(f"{k} {v}")
    return ", ".join(parts)


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
                "EM_C->M": data.get("transitions", {}).get("EM_C->M"),
                "EM_M->C": data.get("transitions", {}).get("EM_M->C"),
                "extra_forward_passes_per_token": meta["extra_forward_passes_per_token"],
                "time_relative_to_no_steering": sum(steered) / len(steered) if steered else 1.0,
                "inference_time": meta["inference_time"],
                "hyperparameters": meta["hyperparameters"],
            }
        )
    return rows


def baseline_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: EM_C steering to context, EM_M steering to memory, transitions and cost."""
    lines = [
        "| method | EM_C, to context | EM_M, to memory | EM_C→M | EM_M→C "
        "| extra passes / token | time / item (× none) | settings (to context; to memory) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row, data in zip(table_rows(results), results.values()):
        hp = row["hyperparameters"]
        settings = "; ".join(_format_hp(hp[d]) for d in DIRECTIONS if d in hp and hp[d])
        star = "" if row["inference_time"] else " *"
        lines.append(
            f"| {row['method']}{star} | {row['EM_C']:.1f} ± {row['EM_C_std']:.1f} "
            f"| {row['EM_M']:.1f} ± {row['EM_M_std']:.1f} "
            f"| {_transition(data, 'EM_C->M')} | {_transition(data, 'EM_M->C')} "
            f"| {row['extra_forward_passes_per_token']:g} "
            f"| {row['time_relative_to_no_steering']:.2f} | {settings or '–'} |"
        )
    first = next(iter(results.values()))
    lines += [
        "",
        f"{first['model']}, {first['dataset']} dataset: {first['n_items']} held-out memorised "
        f"questions, {first['demo_type']} demonstrations, seeds {first['seeds']}, mean ± std "
        "over seeds (%). `none`: EM_C and EM_M without steering. Settings chosen on the "
        "development (pool) questions only (`cache_data/<model>/baselines/sweep-*.json`). "
        "\\* ICL changes the demonstrations (dss / dso) and is not an inference-time method. "
        "Time: wall time per item relative to no steering in the same run; task vectors and "
        "ActAdd's mean difference are computed once beforehand, CAD runs a second (context-"
        "free) prompt pass per item.",
    ]
    return "\n".join(lines)


def _protocol(config: EvaluationConfig, n_items: int, dataset: str) -> dict[str, Any]:
    return {
        "n_items": n_items,
        "seeds": list(config.seeds),
        "demo_type": config.demo_type,
        "n_shots": config.n_shots,
        "dataset": dataset,
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
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Evaluate every method on the held-out items with its dev-best settings (or, with
    ``reuse``, take saved results of the same protocol and settings), save per-method JSON
    and ``table.json``, return the markdown table and the results.

    ``table.json`` holds the model, the protocol and :func:`table_rows` (what the report
    renders); its ``markdown`` is the same table for people reading the file, never parsed."""
    started = time.perf_counter()
    items = setup.test[:n_items] if n_items else setup.test
    protocol = _protocol(config, len(items), setup.dataset)
    results: dict[str, dict[str, Any]] = {}
    shared: dict[int, tuple[list[str], float]] = {}  # no-steering answers, run once
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
        result = evaluate_method(
            setup.model,
            method,
            items,
            setup.pool,
            config=config,
            dataset_name=setup.dataset,
            progress=setup.progress,
            shared_no_steering=shared,
        )
        result.save(path, Path(out_dir) / f"{name}-predictions.jsonl")
        results[name] = result.to_json()
    table = baseline_table(results)
    model_name = next(iter(results.values()))["model"]
    cache.write_json(
        Path(out_dir) / "table.json",
        {
            "model": model_name,
            "protocol": protocol,
            "rows": table_rows(results),
            "markdown": table,
            "seconds": round(time.perf_counter() - started, 1),
            "machine": describe(),
        },
    )
    return table, results
