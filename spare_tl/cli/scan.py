"""``spare-tl scan``: the steerability scan on development questions (:mod:`spare_tl.stages.scan`)."""

from __future__ import annotations

from pathlib import Path

from spare_tl import checks
from spare_tl.cli.args import add_dtype_argument, check_dataset, load_model_for
from spare_tl.data.datasets import load_dataset
from spare_tl.data.prompts import split_pool
from spare_tl.layer_spec import parse_layers
from spare_tl.saes import SITES
from spare_tl.stages.evaluation import development_items
from spare_tl.stages.pipeline import PipelineConfig, run_pipeline
from spare_tl.stages.scan import ScanConfig, cached_scan, scan_dir, scan_table


def register(sub) -> None:
    p = sub.add_parser(
        "scan",
        help="steerability scan: patch each layer's last prompt position from a donor run",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("config", help="pipeline config (.toml or .yaml): model, dataset, pool")
    p.add_argument("--layers", nargs="+", default=None, help="e.g. 0-29 (default every layer)")
    p.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    p.add_argument("--n-items", type=int, default=128, help="development questions (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="demonstration seed")
    p.add_argument("--batch-size", type=int, default=16)
    add_dtype_argument(p)
    p.add_argument("--figure", default=None, help="also write the figure as HTML here")
    p.set_defaults(func=_scan_command)


def _scan_command(args) -> int:
    checks.at_least(args.n_items, 1, "--n-items")
    checks.at_least(args.batch_size, 1, "--batch-size")
    if args.figure:
        checks.output_file(args.figure, "--figure")
    config = PipelineConfig.from_file(args.config)
    check_dataset(config.dataset, f"the dataset of {args.config}")
    layers = tuple(parse_layers(args.layers)) if args.layers else None
    scan_config = ScanConfig(
        layers=layers, sites=tuple(args.sites), seed=args.seed, batch_size=args.batch_size
    )
    from spare_tl import distributed

    ranks = distributed.init()  # under torchrun the layers are split across ranks
    options = {"device": distributed.device_for(ranks)} if ranks.distributed else {}
    model = load_model_for(config.model, args.dtype, **options)
    memorised = run_pipeline(config, until="memorised", model=model).memorised
    assert memorised is not None
    memorised.require(config.pool_size)
    split = split_pool(memorised.filter(load_dataset(config.dataset)), config.pool_size,
                       config.pool_seed)  # fmt: skip
    items = development_items(split.development, args.n_items)
    root = Path(config.cache_root) if config.cache_root else None
    if ranks.distributed:
        from spare_tl.stages.sharded import scan_sharded

        result = scan_sharded(model, items, split.pool, scan_config, root=root)
        distributed.finish()
        if not ranks.is_main:
            return 0
    else:
        result = cached_scan(model, items, split.pool, scan_config, root=root)
    print(scan_table(result))
    for direction in ("memory", "context"):
        print(
            f"steerable to {direction} (residual patch >= half the best gain): "
            f"layers {result.steerable_layers(direction)}"
        )
    print(f"saved: {scan_dir(model.cfg.model_name, root) / 'scan.json'}")
    if args.figure:
        from spare_tl.viz import steerability_scan as scan_figure

        scan_figure(result).write_html(args.figure, include_plotlyjs=True)
        print(f"figure: {args.figure}")
    return 0
