"""``spare-tl sweep``: choose site, layer window, K and α per direction on development questions.

The sweep itself is :func:`spare_tl.stages.sweep.sweep`; this module parses the command line,
runs the pipeline up to the statistics, saves ``sweep.json`` and, with ``--write-features``,
the chosen feature set.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from spare_tl import cache, checks
from spare_tl.cli.args import add_dtype_argument, check_dataset, load_model_for
from spare_tl.data.prompts import relation_histogram
from spare_tl.saes import DEFAULT_SITE
from spare_tl.stages.evaluation import development_items
from spare_tl.stages.pipeline import PipelineConfig, run_pipeline
from spare_tl.stages.scan import scan_dir, scan_of_questions
from spare_tl.stages.sweep import (
    MAX_NEITHER_RISE,
    MIN_ORACLE_GAIN,
    TARGET,
    best_settings,
    combine_sweeps,
    display_path,
    features_from_sweep,
    grid,
    oracle_shares,
    parse_layer_set,
    save_sweep,
    sweep,
    windows,
)


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
        "--selections",
        nargs="+",
        default=["mi"],
        choices=["mi", "attribution", "both"],
        help="how features are chosen, tried per direction: mutual information (the paper), "
        "attribution (the attribution stage, computed for the swept layers) or both",
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


def run_from_args(args) -> int:
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
    if args.output:
        checks.output_dir(args.output)
    check_dataset(config.dataset, f"the dataset of {args.config}")
    from spare_tl import distributed

    ranks = distributed.init()  # under torchrun the stages and the settings are split
    options = {"device": distributed.device_for(ranks)} if ranks.distributed else {}
    model = load_model_for(config.model, args.dtype, **options)
    result = run_pipeline(config, until="statistics", model=model, ranks=ranks)
    directory = Path(args.output) if args.output else cache.stage_dir(model.cfg.model_name, "sweep")
    items = development_items(result.split.development, args.n_items)
    attribution = distributed.main_first(
        lambda: _attribution(args, config, model, result, layer_sets), ranks
    )
    if ranks.distributed and args.combine:
        distributed.finish()
        if not ranks.is_main:
            return 0
    if args.combine:
        records, sweep_config = combine_sweeps([Path(p) for p in args.combine])
        sweep_config["max_neither_rise"] = cap
    else:
        settings = grid(
            layer_sets,
            args.proportions,
            args.strengths,
            args.directions,
            args.selections,
            config.latent_code,
        )
        if ranks.is_main:
            print(f"sweep: {len(settings)} settings on {len(items)} development questions")
            dev, test = relation_histogram(items), relation_histogram(result.split.test[:200])
            print("relation: development / test[:200]")
            for rel in sorted(set(dev) | set(test)):
                print(f"  {rel:24s} {dev.get(rel, 0):4d} {test.get(rel, 0):4d}")
        common = (model, result.site_statistics, result.saes, items, result.split.pool, settings)
        if ranks.distributed:
            from spare_tl.stages.sharded_pipeline import SWEEP_STAGE, sweep_sharded

            root = Path(config.cache_root) if config.cache_root else None
            records_dir = cache.stage_dir(model.cfg.model_name, SWEEP_STAGE, root)
            records = sweep_sharded(*common, records_dir, attribution=attribution)
            distributed.finish()
            if not ranks.is_main:
                return 0
        else:
            records = sweep(*common, attribution=attribution)
        sweep_config = {
            "layer_sets": {site: sets for site, sets in layer_sets.items()},
            "proportions": args.proportions,
            "strengths": args.strengths,
            "selections": args.selections,
            "n_items": len(items),
            "items": cache.fingerprint([it.question for it in items]),
            "latent_code": config.latent_code,
            "dtype": str(model.cfg.dtype),
            "max_neither_rise": cap,
            "dev_set": "development questions (split per relation from the held-out ones, "
            "disjoint from the test), the test protocol (doo, 3 shots, one demonstration set, "
            "seed 0)",
            "relations": relation_histogram(items),
            "test_relations": relation_histogram(result.split.test[:200]),
            "seconds": round(time.time() - start),
        }
    sweep_config["command"] = _command_line()
    oracle = _oracle(records, sweep_config, model.cfg.model_name, items, config)
    save_sweep(records, directory, sweep_config, oracle)
    return _report(
        records, result, config, model, directory, args.write_features, cap, oracle, attribution
    )


def _attribution(args, config, model, result, layer_sets) -> dict[str, Any] | None:
    """The attribution of the layers swept with a selection other than MI (the swept layer
    sets, or for ``--combine`` the layers of the parts' such records); None when there are
    none. Cached: the attribution stage."""
    needed: dict[str, set[int]] = {}
    if args.combine:
        for path in args.combine:
            for rec in cache.read_json(Path(path))["records"]:
                if rec.get("selection", "mi") != "mi":
                    site = rec.get("site") or DEFAULT_SITE
                    needed.setdefault(site, set()).update(rec["layers"])
    elif set(args.selections) - {"mi"}:
        for site, sets in layer_sets.items():
            needed[site] = {x for ls in sets for x in ls}
    if not needed:
        return None
    from spare_tl.stages.attribution import attribution_by_site

    return attribution_by_site(
        model,
        result.grouped,
        result.site_statistics,
        result.saes,
        {site: sorted(layers) for site, layers in needed.items()},
        batch_size=config.batch_size,
        cache_root=Path(config.cache_root) if config.cache_root else None,
    )


def _command_line() -> str:
    """The command as typed (``spare-tl sweep ...``), for the saved JSON."""
    return " ".join(["spare-tl", *map(shlex.quote, sys.argv[1:])])


def _oracle(records, sweep_config, model_name, items, config) -> dict[str, Any] | None:
    """The oracle shares from the cached steerability scan, when it scanned these questions."""
    root = Path(config.cache_root) if config.cache_root else None
    directory = scan_dir(model_name, root)
    if not (directory / "scan.json").exists():
        print("no steerability scan cached: run `spare-tl scan` for the oracle shares")
        return None
    scan = scan_of_questions(directory, cache.fingerprint([it.question for it in items]))
    if scan is None:
        print(
            f"the cached scan asked other development questions than the sweep ({len(items)}): "
            f"no oracle shares (run `spare-tl scan --n-items {len(items)}`)"
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
    attribution: Mapping[str, Any] | None = None,
) -> int:
    """Print the best settings and oracle shares; with ``write_features``, save the set."""
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
            "chosen_by": display_path(directory / "sweep.json"),
        }
        features = features_from_sweep(
            records,
            result.site_statistics,
            model.cfg.model_name,
            metadata=metadata,
            max_neither_rise=max_neither_rise,
            attribution=attribution,
            latent_code=config.latent_code,
        )
        features.save(Path(config.features_dir))
        for direction in ("context", "memory"):
            print(f"wrote {config.features_dir}: to {direction} {features.describe(direction)}")
    return 0
