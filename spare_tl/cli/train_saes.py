"""``spare-tl train-saes``: train, check and save the embedded model's SAEs (:mod:`spare_tl.stages.train_saes`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from spare_tl.cache import stage_dir
from spare_tl.saes import SITES
from spare_tl.stages.sae_config import STAGE, SAETrainingConfig
from spare_tl.stages.train_saes import load_metrics, train_saes


def format_metrics_table(record: dict[str, Any]) -> str:
    """A plain-text table: one row per layer, plus each run's wall time."""
    header = (
        f"{'layer':>11}  {'d_sae':>6}  {'k':>4}  {'EV':>6}  {'L0':>6}  {'dead %':>6}  "
        f"{'CE clean':>8}  {'CE SAE':>8}  {'dCE':>7}"
    )
    lines = [f"SAEs for {record.get('model_name', '?')} (held-out prompts)", header]
    for layer, m in record.get("layers", {}).items():
        lines.append(
            f"{layer:>11}  {m['d_sae']:>6}  {m['k']:>4}  {m['explained_variance']:>6.3f}  "
            f"{m['mean_l0']:>6.1f}  {100 * m['dead_fraction']:>6.1f}  {m['ce_clean']:>8.3f}  "
            f"{m['ce_spliced']:>8.3f}  {m['ce_increase']:>7.3f}"
        )
    for fp, run in record.get("runs", {}).items():
        c = run["config"]
        lines.append(
            f"run {fp}: layers {run['layers']}, {c['training_tokens']:,} tokens, k={c['k']}, "
            f"lr={c['lr']}, wall time {run['wall_time_s'] / 60:.1f} min "
            f"(training {run['train_time_s'] / 60:.1f} min)"
        )
    return "\n".join(lines)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = SAETrainingConfig()
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    parser.add_argument(
        "--dataset", default="builtin", help="conflict dataset for the prompts (default builtin)"
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=list(d.layers), help="layers (default 10-17)"
    )
    parser.add_argument(
        "--site",
        choices=SITES,
        default=d.site,
        help="where the SAEs read: the residual (default) or the attention / MLP output",
    )
    parser.add_argument("--tokens", type=int, default=d.training_tokens, help="training tokens")
    parser.add_argument("--output", default=None, help="output folder (default: cache_data)")
    parser.add_argument("--k", type=int, default=d.k, help="TopK k")
    parser.add_argument("--d-sae", type=int, default=None, help="latents (default 4 x d_model)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    parser.add_argument("--batch-tokens", type=int, default=d.train_batch_size_tokens)
    parser.add_argument("--context-size", type=int, default=d.context_size)
    parser.add_argument("--heldout-prompts", type=int, default=d.heldout_prompts)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--decoder-bias-init",
        choices=("mean", "zero"),
        default=d.decoder_bias_init,
        help="initial decoder bias: the activation mean (default) or zero (SAELens's default)",
    )


def config_from_args(args: argparse.Namespace) -> SAETrainingConfig:
    return SAETrainingConfig(
        layers=tuple(args.layers),
        site=args.site,
        k=args.k,
        d_sae=args.d_sae,
        training_tokens=args.tokens,
        lr=args.lr,
        train_batch_size_tokens=args.batch_tokens,
        context_size=args.context_size,
        heldout_prompts=args.heldout_prompts,
        seed=args.seed,
        decoder_bias_init=args.decoder_bias_init,
    )


def run_from_args(args: argparse.Namespace) -> int:
    from spare_tl import checks
    from spare_tl.cli.args import check_dataset
    from spare_tl.data.datasets import load_dataset
    from spare_tl.embedded import EMBEDDED_MODEL
    from spare_tl.models import load_model

    cfg = config_from_args(args)
    model_name = args.model or EMBEDDED_MODEL
    if args.output:
        checks.output_dir(args.output)
    check_dataset(args.dataset)
    t0 = time.perf_counter()
    model = load_model(model_name)
    items = load_dataset(args.dataset)
    output = Path(args.output) if args.output else stage_dir(model.cfg.model_name, STAGE)
    record = train_saes(model, items, cfg, output, model_name=model.cfg.model_name)
    print(format_metrics_table(record))
    print(f"total wall time incl. model load: {(time.perf_counter() - t0) / 60:.1f} min")
    print(f"written to {output}")
    return 0


def _print_metrics(args: argparse.Namespace) -> int:
    print(format_metrics_table(load_metrics(args.directory)))
    return 0


def register(sub: Any) -> None:
    """Add ``train-saes`` and ``sae-metrics``."""
    train = sub.add_parser(
        "train-saes",
        help="train the model's TopK SAEs (SAELens) on conflict prompts",
        description=__doc__.split("\n\n")[0],
    )
    add_train_arguments(train)
    train.set_defaults(func=run_from_args)
    show = sub.add_parser("sae-metrics", help="print the held-out metrics of trained SAEs")
    show.add_argument("directory", nargs="?", default=None, help="SAE folder (default: cache)")
    show.set_defaults(func=_print_metrics)
