"""``spare-tl attribution``: each SAE latent's estimated effect on the answer (attribution
patching on the grouped pool prompts), cached under ``cache_data/<model>/attribution/``.

The stage is :func:`spare_tl.stages.attribution.latent_attribution`; this module runs the
pipeline up to the statistics, the stage for the chosen layers, and prints per layer how the
features chosen by attribution at the config's K overlap those chosen by mutual information.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from spare_tl.cli.args import add_dtype_argument, check_dataset, load_model_for
from spare_tl.saes import DEFAULT_SITE


def register(sub) -> None:
    """Add ``attribution``."""
    p = sub.add_parser(
        "attribution",
        help="estimate each SAE latent's effect on the answer (attribution patching)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("config", help="pipeline config (.toml/.yaml)")
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="layers at --site (default: the layers both directions' feature sets edit)",
    )
    p.add_argument("--site", default=None, help="the site of --layers (default resid_post)")
    add_dtype_argument(p)
    p.set_defaults(func=run_from_args)


def default_layers(config: Any) -> dict[str, list[int]]:
    """Per site, the layers either direction's feature set edits under ``config``."""
    out: dict[str, set[int]] = {}
    for setting in config.direction_settings().values():
        out.setdefault(setting.site, set()).update(setting.layers)
    return {site: sorted(layers) for site, layers in out.items()}


def run_from_args(args) -> int:
    from spare_tl.features import select_features
    from spare_tl.saes import check_site
    from spare_tl.stages.attribution import attribution_by_site
    from spare_tl.stages.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig.from_file(args.config)
    if args.layers:
        site = check_site(args.site or DEFAULT_SITE)
        layers = {site: sorted(set(args.layers))}
    elif args.site:
        raise ValueError("--site needs --layers")
    else:
        layers = default_layers(config)
    for site, site_layers in layers.items():
        outside = sorted(set(site_layers) - set(config.candidate_layers(site)))
        if outside:
            raise ValueError(
                f"the {site} layers {outside} are not candidate layers of {args.config} "
                f"({config.candidate_layers(site)})"
            )
    check_dataset(config.dataset, f"the dataset of {args.config}")
    start = time.time()
    model = load_model_for(config.model, args.dtype)
    result = run_pipeline(config, until="statistics", model=model)
    ready = time.time()
    attribution = attribution_by_site(
        model,
        result.grouped,
        result.site_statistics,
        result.saes,
        layers,
        batch_size=config.batch_size,
        cache_root=Path(config.cache_root) if config.cache_root else None,
    )
    done = time.time()
    settings = config.direction_settings()
    rows = []
    for site, by_layer in attribution.items():
        stats = result.site_statistics[site]
        for layer, a in by_layer.items():
            row: dict[str, Any] = {"site": site, "layer": layer, "prompts": a.counts}
            for direction, setting in settings.items():
                k = setting.proportion
                s = stats[layer]
                mi = select_features("mi", k, s.mutual_information, s.expectation)
                attr = select_features(
                    "attribution", k, s.mutual_information, s.expectation, a.toward(direction)
                )
                mi_ids = set(mi[0].tolist() + mi[1].tolist())
                attr_ids = set(attr[0].tolist() + attr[1].tolist())
                row[f"to_{direction}"] = {
                    "K": k,
                    "mi": len(mi_ids),
                    "attribution": len(attr_ids),
                    "shared": len(mi_ids & attr_ids),
                    "top": a.toward(direction).topk(5).indices.tolist(),
                }
            rows.append(row)
    print(json.dumps(rows, indent=1))
    print(
        f"attribution of {sum(len(v) for v in attribution.values())} layer(s): "
        f"{done - ready:.0f} s (pipeline up to the statistics: {ready - start:.0f} s)"
    )
    return 0
