"""Choose the edit site, layer window, proportion K and edit strength α per direction on
development questions only.

The development questions are held-out memorised questions disjoint from the test ones
(:func:`spare_tl.evaluation.development_items`: the tail of the held-out list, relations
interleaved), asked with exactly the test protocol (demonstrations from the pool,
:func:`spare_tl.evaluation.evaluation_demonstrations`). Every setting is one condition of the
shared-prefix harness, so a grid over every window of 2-6 consecutive layers at each SAE site
costs one prompt pass per batch plus the last token and the decoding per setting. The best
setting per direction is the highest EM in that direction among those that break at most
``max_neither_rise`` points more answers than no steering (ties: fewer broken answers). The
sweep is saved as JSON, with the steerability scan's oracle at the chosen layers when a scan
of the same questions is cached.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.activations import (
    LayerStatistics,
    directional_features,
    functional_features,
    statistics_at,
)
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.evaluation import evaluation_demonstrations
from spare_tl.features import FunctionalFeatures
from spare_tl.hardware import add_dtype_argument, load_model_for
from spare_tl.harness import Condition, NoSteering, SpareMethod, answer_conditions
from spare_tl.layer_spec import parse_layers
from spare_tl.saes import DEFAULT_SITE, check_site, site_hook_name

logger = logging.getLogger(__name__)

TARGET = {"context": "EM_C", "memory": "EM_M"}
#: the default cap on broken answers for a chosen setting (points over no steering)
MAX_NEITHER_RISE = 10.0
#: below this gain (points) the scan's donor patch is no ceiling and no share is given
MIN_ORACLE_GAIN = 5.0


def answer_shares(answers: Sequence[str], items: Sequence[ConflictItem]) -> dict[str, float]:
    """EM_C, EM_M and neither (%) of greedy answers to ``items``."""
    labels = [behaviour_label(a, it) for a, it in zip(answers, items)]
    n = max(len(labels), 1)
    return {
        "EM_C": 100.0 * labels.count("context") / n,
        "EM_M": 100.0 * labels.count("memory") / n,
        "neither": 100.0 * labels.count("neither") / n,
    }


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: steer to ``direction`` at ``site`` of ``layers`` with K, α."""

    direction: str
    site: str
    layers: tuple[int, ...]
    proportion: float
    edit_strength: float

    def __post_init__(self) -> None:
        if self.direction not in TARGET:
            raise ValueError(f"direction must be 'context' or 'memory', got {self.direction!r}")
        check_site(self.site)
        if not self.layers:
            raise ValueError("a setting needs at least one layer")


def windows(
    layers: Sequence[int], sizes: Sequence[int] = (2, 3, 4, 5, 6), stride: int = 1
) -> list[tuple[int, ...]]:
    """Every run of ``size`` consecutive layers inside ``layers`` (for each size), starting
    every ``stride`` layers."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    have = sorted(set(int(x) for x in layers))
    out: list[tuple[int, ...]] = []
    for size in sizes:
        if size < 1:
            raise ValueError(f"window sizes must be >= 1, got {size}")
        for start in have[::stride]:
            window = tuple(range(start, start + size))
            if set(window) <= set(have):
                out.append(window)
    return out


def grid(
    layer_sets: Mapping[str, Sequence[Sequence[int]]],
    proportions: Sequence[float],
    strengths: Sequence[float],
    directions: Sequence[str] = ("context", "memory"),
) -> list[Setting]:
    """Every (site, layers) of ``layer_sets`` (site → layer sets) × K × α × direction."""
    return [
        Setting(d, site, tuple(sorted(ls)), float(k), float(a))
        for site, sets in layer_sets.items()
        for ls in sets
        for k in proportions
        for a in strengths
        for d in directions
    ]


def sweep(
    model,
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    saes: Mapping[Any, Any],
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    settings: Sequence[Setting],
    *,
    n_shots: int = 3,
    seed: int = 0,
    demo_type: str = "doo",
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """EM per setting on the development ``items`` (demonstrations from ``pool`` as in the
    test protocol); first record: no steering.

    ``statistics``: per layer (the residual's) or by site then layer; ``saes``: keyed by hook
    name (any site) or by layer (residual). Every setting is a condition of the one harness
    (:func:`spare_tl.harness.answer_conditions`)."""
    if not items:
        raise ValueError("the sweep needs at least one development question")
    demos = evaluation_demonstrations(items, pool, n_shots, seed)
    conditions = [Condition("none", NoSteering())]
    feature_sets = []
    for i, setting in enumerate(settings):
        features = functional_features(
            statistics_at(statistics, setting.site),
            model_name=model.cfg.model_name,
            proportion=setting.proportion,
            edit_strength=setting.edit_strength,
            layers=setting.layers,
        )
        feature_sets.append(features)
        method = SpareMethod(features, _saes_for(saes, setting))
        conditions.append(Condition(f"setting {i}", method, setting.direction))  # type: ignore[arg-type]
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
            "site": "",
            "layers": [],
            "proportion": 0.0,
            "edit_strength": 0.0,
            "n": len(items),
            **answer_shares(answers["none"], items),
        }
    ]
    for i, (setting, features) in enumerate(zip(settings, feature_sets)):
        rec = {
            "direction": setting.direction,
            "site": setting.site,
            "layers": list(setting.layers),
            "proportion": setting.proportion,
            "edit_strength": setting.edit_strength,
            "n": len(items),
            "n_features": sum(c + m for c, m in features.counts().values()),
            **answer_shares(answers[f"setting {i}"], items),
        }
        logger.info("sweep %s", rec)
        records.append(rec)
    return records


def _saes_for(saes: Mapping[Any, Any], setting: Setting) -> dict[str, Any]:
    out = {}
    for layer in setting.layers:
        hook = site_hook_name(layer, setting.site)
        if hook in saes:
            out[hook] = saes[hook]
        elif setting.site == DEFAULT_SITE and layer in saes:
            out[hook] = saes[layer]
        else:
            raise ValueError(f"no SAE for {hook}; the sweep's SAEs: {sorted(map(str, saes))}")
    return out


def best_settings(
    records: Sequence[dict[str, Any]], max_neither_rise: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per direction, the record with the highest EM in that direction (then fewest broken)
    among those whose "neither" share is at most ``max_neither_rise`` points above no
    steering's (all records when none qualifies or the cap is None)."""
    none = next((r for r in records if r["direction"] == "none"), None)
    out = {}
    for direction, key in TARGET.items():
        cands = [r for r in records if r["direction"] == direction]
        if max_neither_rise is not None and none is not None:
            kept = [r for r in cands if r["neither"] <= none["neither"] + max_neither_rise]
            cands = kept or cands
        if cands:
            out[direction] = max(cands, key=lambda r: (r[key], -r["neither"]))
    return out


def oracle_shares(
    records: Sequence[dict[str, Any]], best: Mapping[str, Mapping[str, Any]], scan: Any
) -> dict[str, dict[str, float | None]]:
    """Per chosen setting: the scan's oracle (best single-layer donor patch) at the same site
    and layers, and the share of the oracle's gain over no steering that the setting reaches.
    ``share`` is None when the oracle gains less than :data:`MIN_ORACLE_GAIN` points there
    (its donor is then no ceiling to measure against)."""
    none = next(r for r in records if r["direction"] == "none")
    out: dict[str, dict[str, float | None]] = {}
    for direction, rec in best.items():
        key = TARGET[direction]
        site = rec.get("site") or DEFAULT_SITE
        try:
            oracle = scan.oracle(direction, rec["layers"], site)
        except ValueError:
            continue
        oracle_gain = oracle - scan.baseline[key]
        gain = rec[key] - none[key]
        out[direction] = {
            "oracle_EM": oracle,
            "oracle_gain": oracle_gain,
            "spare_gain": gain,
            "share": gain / oracle_gain if oracle_gain >= MIN_ORACLE_GAIN else None,
        }
    return out


def features_from_sweep(
    records: Sequence[dict[str, Any]],
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    model_name: str,
    *,
    metadata: dict[str, Any] | None = None,
    max_neither_rise: float | None = None,
) -> FunctionalFeatures:
    """The feature set of the sweep's best setting per direction (each at its own site, layers,
    K and α), exactly the setting measured on the development set
    (:func:`~spare_tl.activations.directional_features`)."""
    best = best_settings(records, max_neither_rise)
    if "context" not in best or "memory" not in best:
        raise ValueError("the sweep has no steered records for both directions")
    return directional_features(
        statistics,
        model_name=model_name,
        context=_setting_of(best["context"]),
        memory=_setting_of(best["memory"]),
        metadata=metadata,
    )


def _setting_of(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "site": record.get("site") or DEFAULT_SITE,
        "layers": record["layers"],
        "proportion": record["proportion"],
        "edit_strength": record["edit_strength"],
    }


def save_sweep(
    records: Sequence[dict[str, Any]],
    directory: Path,
    config: dict[str, Any],
    oracle: Mapping[str, Any] | None = None,
) -> None:
    """Write ``sweep.json``: the config, every record, the best per direction (with the
    config's ``max_neither_rise``) and, when given, the oracle shares."""
    best = best_settings(records, config.get("max_neither_rise"))
    data: dict[str, Any] = {"config": config, "records": list(records), "best": best}
    if oracle is not None:
        data["oracle"] = dict(oracle)
    cache.write_json(Path(directory) / "sweep.json", data)


def _display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (committed metadata)."""
    try:
        return str(Path(path).resolve().relative_to(cache.REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


def parse_layer_set(spec: str) -> tuple[str, list[int]]:
    """``"19-22"`` (the residual) or ``"attn_out:20-23"`` → (site, layers)."""
    site, _, layers = spec.rpartition(":")
    return check_site(site or DEFAULT_SITE), parse_layers([layers])


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
            key = (
                rec["direction"],
                rec.get("site") or DEFAULT_SITE,
                tuple(rec["layers"]),
                rec["proportion"],
                rec["edit_strength"],
            )
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


def add_arguments(parser) -> None:
    parser.add_argument("config", help="pipeline config (.toml/.yaml)")
    parser.add_argument(
        "--layer-sets",
        nargs="+",
        default=None,
        help="layer sets, each '19-22' (residual) or 'attn_out:20-23'",
    )
    parser.add_argument(
        "--windows",
        nargs="+",
        default=None,
        metavar="SITE:LAYERS",
        help="every window of --window-sizes consecutive layers in these ranges, e.g. "
        "resid_post:10-26 attn_out:19-24 (added to --layer-sets)",
    )
    parser.add_argument("--window-sizes", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--window-stride", type=int, default=1)
    parser.add_argument("--proportions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument(
        "--directions", nargs="+", default=["context", "memory"], choices=list(TARGET)
    )
    parser.add_argument(
        "--n-items", type=int, default=128, help="development questions (default 128)"
    )
    parser.add_argument(
        "--max-neither-rise",
        type=float,
        default=MAX_NEITHER_RISE,
        help="a chosen setting breaks at most this many points more answers than no "
        f"steering (default {MAX_NEITHER_RISE:g}; a negative value: no cap)",
    )
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


def register(sub) -> None:
    """Add ``sweep``."""
    p = sub.add_parser(
        "sweep",
        help="choose site, layer window, K and α per direction on development questions",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> int:
    """``python -m spare_tl.sweep CONFIG`` (the same as ``spare-tl sweep CONFIG``)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_from_args(args) -> int:
    import time

    import torch

    from spare_tl import checks
    from spare_tl.evaluation import development_items
    from spare_tl.pipeline import PipelineConfig, run_pipeline

    checks.at_least(args.n_items, 1, "--n-items")
    torch.set_grad_enabled(False)
    start = time.time()
    config = PipelineConfig.from_file(args.config)
    layer_sets: dict[str, list[list[int]]] = {}
    for spec in args.layer_sets or []:
        site, layers = parse_layer_set(spec)
        layer_sets.setdefault(site, []).append(layers)
    for spec in args.windows or []:
        site, layers = parse_layer_set(spec)
        for window in windows(layers, args.window_sizes, args.window_stride):
            if list(window) not in layer_sets.get(site, []):
                layer_sets.setdefault(site, []).append(list(window))
    if not layer_sets:
        layer_sets = {DEFAULT_SITE: [list(config.layers)]}
    for site, sets in layer_sets.items():
        missing = sorted({x for ls in sets for x in ls} - set(config.candidate_layers(site)))
        if missing:
            raise ValueError(
                f"the {site} layers {missing} are not candidate layers of {args.config} "
                f"({config.candidate_layers(site)}); add them to its "
                f"{'layers' if site == DEFAULT_SITE else 'site_layers'}"
            )
    cap = None if args.max_neither_rise < 0 else args.max_neither_rise
    model = load_model_for(config.model, args.dtype)
    result = run_pipeline(config, until="statistics", model=model)
    directory = Path(args.output) if args.output else cache.stage_dir(model.cfg.model_name, "sweep")
    items = development_items(result.split.evaluation, args.n_items)
    if args.combine:
        records, sweep_config = combine_sweeps([Path(p) for p in args.combine])
        sweep_config["max_neither_rise"] = cap
    else:
        settings = grid(layer_sets, args.proportions, args.strengths, args.directions)
        print(f"sweep: {len(settings)} settings on {len(items)} development questions")
        records = sweep(
            model, result.site_statistics, result.saes, items, result.split.pool, settings
        )
        sweep_config = {
            "layer_sets": {site: sets for site, sets in layer_sets.items()},
            "proportions": args.proportions,
            "strengths": args.strengths,
            "n_items": len(items),
            "items": cache.fingerprint([it.question for it in items]),
            "latent_code": config.latent_code,
            "max_neither_rise": cap,
            "dev_set": "the last held-out questions (development_items), the test protocol "
            "(doo, 3 shots, demonstration seed 0)",
            "seconds": round(time.time() - start),
        }
    sweep_config["command"] = _command_line()
    oracle = _oracle(records, sweep_config, model.cfg.model_name, items, config)
    save_sweep(records, directory, sweep_config, oracle)
    return _report(records, result, config, model, directory, args.write_features, cap, oracle)


def _command_line() -> str:
    """The command as typed (``spare-tl sweep ...``), for the saved JSON."""
    import shlex
    import sys

    prog = "spare-tl" if Path(sys.argv[0]).name == "spare-tl" else "python -m spare_tl.sweep"
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])


def _oracle(records, sweep_config, model_name, items, config) -> dict[str, Any] | None:
    """The oracle shares from the cached steerability scan, when it scanned these questions."""
    from spare_tl.scan import ScanResult, scan_dir

    root = Path(config.cache_root) if config.cache_root else None
    directory = scan_dir(model_name, root)
    if not (directory / "scan.json").exists():
        print("no steerability scan cached: run `spare-tl scan` for the oracle shares")
        return None
    scan = ScanResult.load(directory)
    scanned = cache.read_json(directory / cache.CONFIG)["config"].get("items")
    if scanned != cache.fingerprint([it.question for it in items]):
        print(
            f"the cached scan asked other development questions ({scan.n_items}) than the "
            f"sweep ({len(items)}): no oracle shares (run `spare-tl scan --n-items {len(items)}`)"
        )
        return None
    return oracle_shares(
        records, best_settings(records, sweep_config.get("max_neither_rise")), scan
    )


def _report(
    records: Sequence[dict[str, Any]],
    result: Any,
    config: Any,
    model: Any,
    directory: Path,
    write_features: bool,
    max_neither_rise: float | None = None,
    oracle: Mapping[str, Any] | None = None,
) -> int:
    """Print the best settings and oracle shares; with ``write_features``, save the set."""
    import json

    best = best_settings(records, max_neither_rise)
    print(json.dumps({"no_steering": records[0], **best}, indent=1))
    for direction, o in (oracle or {}).items():
        share = (
            f"{100 * o['share']:.0f} %"
            if o["share"] is not None
            else f"n/a (the donor gains < {MIN_ORACLE_GAIN:g} points: no ceiling)"
        )
        print(
            f"to {direction}: SpARE gains {o['spare_gain']:+.1f} points, the scan's oracle at "
            f"the same layers {o['oracle_gain']:+.1f} (EM {o['oracle_EM']:.1f}): share {share}"
        )
    print(f"saved: {directory / 'sweep.json'}")
    if write_features:
        metadata = {
            **config.features_metadata(),
            "chosen_by": _display_path(directory / "sweep.json"),
        }
        features = features_from_sweep(
            records,
            result.site_statistics,
            model.cfg.model_name,
            metadata=metadata,
            max_neither_rise=max_neither_rise,
        )
        features.save(Path(config.features_dir))
        for direction in ("context", "memory"):
            f = features.for_direction(direction)
            print(
                f"wrote {config.features_dir}: to {direction} {f.site} layers "
                f"{sorted(f.layers)}, K {f.proportion}, α {features.strength(direction)}, "
                f"features {f.counts()}"
            )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
