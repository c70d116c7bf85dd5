"""Choose layers, proportion K and edit strength α on the development (pool) set only.

Every pool question is asked with ``n_shots`` demonstrations drawn from the *other* pool
questions, steered to context and to memory for each (layers, K, α); the best setting per
direction is the one with the highest EM in that direction (ties broken by fewer broken
answers). Test questions are never looked at. The sweep is saved as JSON so figures and
reports can show it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.activations import LayerStatistics, directional_features, functional_features
from spare_tl.data.prompts import sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.features import FunctionalFeatures
from spare_tl.hardware import add_dtype_argument, load_model_for
from spare_tl.harness import Condition, NoSteering, SpareMethod, answer_conditions
from spare_tl.layer_spec import parse_layers

logger = logging.getLogger(__name__)


def answer_shares(answers: Sequence[str], items: Sequence[ConflictItem]) -> dict[str, float]:
    """EM_C, EM_M and neither (%) of greedy answers to ``items``."""
    labels = [behaviour_label(a, it) for a, it in zip(answers, items)]
    n = max(len(labels), 1)
    return {
        "EM_C": 100.0 * labels.count("context") / n,
        "EM_M": 100.0 * labels.count("memory") / n,
        "neither": 100.0 * labels.count("neither") / n,
    }


def dev_demonstrations(
    pool: Sequence[ConflictItem], n_items: int | None, n_shots: int, seed: int
) -> tuple[list[ConflictItem], list[list[ConflictItem]]]:
    """Pool questions as development queries and their demonstrations from the rest of the
    pool."""
    items = list(pool[:n_items] if n_items else pool)
    demos = [
        sample_demonstrations(pool, n_shots, seed * 7 + i, exclude=it) for i, it in enumerate(items)
    ]
    return items, demos


def sweep(
    model,
    statistics: Mapping[int, LayerStatistics],
    saes: Mapping[int, Any],
    pool: Sequence[ConflictItem],
    *,
    layer_sets: Sequence[Sequence[int]],
    proportions: Sequence[float],
    strengths: Sequence[float],
    directions: Sequence[str] = ("context", "memory"),
    n_items: int | None = 48,
    n_shots: int = 3,
    seed: int = 0,
    demo_type: str = "doo",
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """EM per (layers, K, α, direction) on the development set; first record: no steering.

    Every setting is a condition of the one harness (:func:`spare_tl.harness.answer_conditions`),
    so the development prompts are run once per batch and each setting only re-runs the last
    prompt token and its decoding."""
    items, demos = dev_demonstrations(pool, n_items, n_shots, seed)
    grid = [
        (tuple(ls), k, a, d)
        for ls in layer_sets
        for k in proportions
        for a in strengths
        for d in directions
    ]
    conditions = [Condition("none", NoSteering())]
    feature_sets = []
    for i, (layers, proportion, alpha, direction) in enumerate(grid):
        features = functional_features(
            statistics,
            model_name=model.cfg.model_name,
            proportion=proportion,
            edit_strength=alpha,
            layers=layers,
        )
        feature_sets.append(features)
        method = SpareMethod(features, {layer: saes[layer] for layer in layers})
        conditions.append(Condition(f"setting {i}", method, direction))  # type: ignore[arg-type]
    answers = answer_conditions(
        model,
        items,
        demos,
        conditions,
        demo_type=demo_type,
        batch_size=batch_size,
        progress=progress,
        desc="sweep",
    )
    records: list[dict[str, Any]] = [
        {
            "direction": "none",
            "layers": [],
            "proportion": 0.0,
            "edit_strength": 0.0,
            "n": len(items),
            **answer_shares(answers["none"], items),
        }
    ]
    for i, ((layers, proportion, alpha, direction), features) in enumerate(zip(grid, feature_sets)):
        rec = {
            "direction": direction,
            "layers": list(layers),
            "proportion": proportion,
            "edit_strength": alpha,
            "n": len(items),
            "n_features": sum(c + m for c, m in features.counts().values()),
            **answer_shares(answers[f"setting {i}"], items),
        }
        logger.info("sweep %s", rec)
        records.append(rec)
    return records


def best_settings(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per direction, the record with the highest EM in that direction (then fewest broken)."""
    out = {}
    for direction, key in (("context", "EM_C"), ("memory", "EM_M")):
        cands = [r for r in records if r["direction"] == direction]
        if cands:
            out[direction] = max(cands, key=lambda r: (r[key], -r["neither"]))
    return out


def features_from_sweep(
    records: Sequence[dict[str, Any]],
    statistics: Mapping[int, LayerStatistics],
    model_name: str,
    *,
    metadata: dict[str, Any] | None = None,
) -> FunctionalFeatures:
    """The feature set of the sweep's best setting per direction, each exactly the setting
    measured on the development set (:func:`~spare_tl.activations.directional_features`)."""
    best = best_settings(records)
    if "context" not in best or "memory" not in best:
        raise ValueError("the sweep has no steered records for both directions")
    return directional_features(
        statistics,
        model_name=model_name,
        context=best["context"],
        memory=best["memory"],
        metadata=metadata,
    )


def save_sweep(records: Sequence[dict[str, Any]], directory: Path, config: dict[str, Any]) -> None:
    cache.write_json(
        Path(directory) / "sweep.json",
        {"config": config, "records": list(records), "best": best_settings(records)},
    )


def _display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (committed metadata)."""
    try:
        return str(Path(path).resolve().relative_to(cache.REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m spare_tl.sweep CONFIG``: sweep on the pool, save, write the best features."""
    import argparse
    import time

    import torch

    from spare_tl.pipeline import PipelineConfig, run_pipeline

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="pipeline config (.toml/.yaml)")
    parser.add_argument("--layer-sets", nargs="+", default=None, help="e.g. 10-13 12-15 10-17")
    parser.add_argument("--proportions", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--n-items", type=int, default=48)
    parser.add_argument("--write-features", action="store_true", help="save the best setting")
    parser.add_argument(
        "--output",
        default=None,
        help="folder for sweep.json (default: cache_data/<model>/sweep/); parallel runs of "
        "parts of a grid write to separate folders and are joined with --combine",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="SWEEP_JSON",
        help="join these sweep.json files (same dev set) instead of running a sweep",
    )
    add_dtype_argument(parser)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    start = time.time()
    config = PipelineConfig.from_file(args.config)
    from spare_tl.saes import load_saes_for_layers

    model = load_model_for(config.model, args.dtype)
    saes = load_saes_for_layers(model, config.saes, config.layers)
    result = run_pipeline(config, until="statistics", model=model, saes=saes)
    directory = Path(args.output) if args.output else cache.stage_dir(model.cfg.model_name, "sweep")
    if args.combine:
        records, sweep_config = combine_sweeps([Path(p) for p in args.combine])
        save_sweep(records, directory, sweep_config)
        return _report(records, result, config, model, directory, args.write_features)
    layer_sets = (
        [parse_layers([s]) for s in args.layer_sets] if args.layer_sets else [config.layers]
    )
    records = sweep(
        model,
        result.statistics,
        saes,
        result.split.pool,
        layer_sets=layer_sets,
        proportions=args.proportions,
        strengths=args.strengths,
        n_items=args.n_items,
    )
    sweep_config = {
        "layer_sets": layer_sets,
        "proportions": args.proportions,
        "strengths": args.strengths,
        "n_items": args.n_items,
        "latent_code": config.latent_code,
        "dev_set": "pool questions, demonstrations from the rest of the pool (doo, 3 shots, seed 0)",
        "seconds": round(time.time() - start),
    }
    save_sweep(records, directory, sweep_config)
    return _report(records, result, config, model, directory, args.write_features)


def combine_sweeps(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Join sweep.json files of parts of one grid: one no-steering record (they must agree:
    same dev set), every steered record once; the grid lists and seconds are merged."""
    if not paths:
        raise ValueError("nothing to combine: pass sweep.json files")
    parts = [cache.read_json(p) for p in paths]
    base = parts[0]["records"][0]
    for path, part in zip(paths, parts):
        first = part["records"][0]
        if first["direction"] != "none" or first != base:
            raise ValueError(
                f"{path}: its no-steering record differs from {paths[0]}'s; the parts were "
                "not run on the same dev set and model"
            )
    records = [base]
    seen = set()
    for part in parts:
        for rec in part["records"][1:]:
            key = (rec["direction"], tuple(rec["layers"]), rec["proportion"], rec["edit_strength"])
            if key not in seen:
                seen.add(key)
                records.append(rec)
    config = dict(parts[0]["config"])
    for key in ("layer_sets", "proportions", "strengths"):
        merged: list[Any] = []
        for part in parts:
            for value in part["config"].get(key, []):
                if value not in merged:
                    merged.append(value)
        config[key] = merged
    config["seconds"] = sum(part["config"].get("seconds", 0) for part in parts)
    config["combined_from"] = [_display_path(p) for p in paths]
    return records, config


def _report(
    records: Sequence[dict[str, Any]],
    result: Any,
    config: Any,
    model: Any,
    directory: Path,
    write_features: bool,
) -> int:
    """Print the best settings; with ``write_features``, save the chosen feature set."""
    import json

    best = best_settings(records)
    print(json.dumps({"no_steering": records[0], **best}, indent=1))
    if write_features:
        metadata = {
            **config.features_metadata(),
            "chosen_by": _display_path(directory / "sweep.json"),
        }
        features = features_from_sweep(
            records, result.statistics, model.cfg.model_name, metadata=metadata
        )
        features.save(Path(config.features_dir))
        for direction in ("context", "memory"):
            f = features.for_direction(direction)
            print(
                f"wrote {config.features_dir}: to {direction} layers {sorted(f.layers)}, "
                f"K {f.proportion}, α {features.strength(direction)}, features {f.counts()}"
            )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
