"""CLI subcommands for the SpARE pipeline stages (wired by :mod:`spare_tl.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spare_tl import checks
from spare_tl.cli.args import (
    add_dtype_argument,
    check_dataset,
    check_steering_folders,
    load_model_for,
)
from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
from spare_tl.hardware import resolve_dtype

# spare_tl.studies.baselines.METHODS, spelled out so that building the parser imports no torch.
EVALUATE_METHODS = ("spare", "none", "closed_book", "icl", "actadd", "taskvec", "cad")

_STAGE_HELP = {
    "memorised": "find the memorised set (closed-book exact match)",
    "behaviours": "group the pool's conflict prompts by behaviour (context / memory / drop)",
    "activations": "collect last-position residuals of the grouped prompts",
    "statistics": "SAE codes, mutual information and expectation per layer",
    "features": "select functional features at proportion K and save them",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, one subcommand per stage, ``evaluate`` and ``steer``."""
    p = sub.add_parser("run", help="run every stage from a TOML/YAML config (cached stages skip)")
    p.add_argument("config", help="pipeline config (.toml or .yaml)")
    p.add_argument("--output", help="write the evaluation results JSON here")
    add_dtype_argument(p)
    p.set_defaults(func=_run, until="evaluate")
    for stage, text in _STAGE_HELP.items():
        p = sub.add_parser(
            stage, help=text, description=f"{text}; earlier stages come from the cache"
        )
        p.add_argument("config", help="pipeline config (.toml or .yaml)")
        add_dtype_argument(p)
        p.set_defaults(func=_run, until=stage, output=None)
        if stage == "features":
            from spare_tl.cli.features import add_arguments

            p.description = (
                f"{text}; earlier stages come from the cache. Or: `features show LAYER:LATENT` "
                "(a feature card), `features examples`, `features effects`"
            )
            add_arguments(p)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a saved feature set: no steering vs steering to context / memory",
    )
    p.add_argument("--dataset", default="builtin", help="builtin, nqswap, macnoise or a JSONL path")
    p.add_argument("--output", required=True, help="results JSON")
    p.add_argument("--features", default=str(DEFAULT_FEATURES), help="functional-feature folder")
    p.add_argument("--saes", default=str(DEFAULT_SAES), help="folder of SAEs, one per hook")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--n-items", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--demo-type", default="doo", choices=["doo", "dss", "dso"])
    p.add_argument("--shots", type=int, default=3)
    p.add_argument(
        "--demonstrations",
        default="per_seed",
        choices=["per_seed", "per_item"],
        help="one demonstration set per seed before every question (the paper's protocol) "
        "or each question its own",
    )
    p.add_argument("--edit-strength", type=float, default=None, help="override α (both ways)")
    p.add_argument("--predictions", default=None, help="per-item predictions JSONL")
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument(
        "--method",
        default="spare",
        choices=EVALUATE_METHODS,
        help="steering method (baselines in the same harness; see spare_tl.studies.baselines)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        help="actadd/taskvec/cad: development sweep JSON with the dev-best settings "
        "(default cache_data/<model>/baselines/sweep-<method>.json)",
    )
    p.add_argument(
        "--hyperparameters",
        default=None,
        help="actadd/taskvec/cad: JSON setting for both directions instead of the sweep, e.g. "
        '\'{"layers": [10, 11], "coefficient": 2}\', \'{"layer": 12}\', \'{"alpha": 0.5}\'',
    )
    add_dtype_argument(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("steer", help="answer one conflict input unsteered and steered both ways")
    p.add_argument("--context", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--features", default=str(DEFAULT_FEATURES))
    p.add_argument("--saes", default=str(DEFAULT_SAES))
    p.add_argument("--edit-strength", type=float, default=None)
    p.add_argument(
        "--demonstrations",
        type=int,
        default=None,
        help="prepend N (>= 1) doo demonstrations from the pool",
    )
    add_dtype_argument(p)
    p.set_defaults(func=_steer)


def _load_setup(args: argparse.Namespace):
    """``(model, features, saes)`` of ``--features``/``--saes`` with the model in ``--dtype``
    (the SAEs keep their own dtype)."""
    import torch

    from spare_tl import distributed

    options = {}
    if distributed.ranks().distributed:  # each rank's own replica (cuda:<LOCAL_RANK> on GPUs)
        options["device"] = distributed.device_for()
    if resolve_dtype(args.dtype) != torch.float32:
        options["dtype"] = args.dtype
    return load_steering_setup(args.features, args.saes, **options)


def _run(args: argparse.Namespace) -> int:
    from spare_tl.stages.pipeline import PipelineConfig, run_pipeline

    if args.until == "features":
        from spare_tl.cli.features import dispatch

        done = dispatch(args)
        if done is not None:
            return done
    config = PipelineConfig.from_file(args.config)
    if args.output:
        checks.output_file(args.output)
    if config.features_dir:
        checks.output_dir(config.features_dir, "features_dir")
    check_dataset(config.dataset, f"the dataset of {args.config}")
    from spare_tl import distributed

    ranks = distributed.init()  # under torchrun the stages' work units are split across ranks
    options = {"device": distributed.device_for(ranks)} if ranks.distributed else {}
    model = load_model_for(config.model, args.dtype, **options)
    result = run_pipeline(config, until=args.until, model=model, ranks=ranks)
    distributed.finish()
    if not ranks.is_main:
        return 0
    if result.features is not None:
        print(json.dumps({"counts": {str(k): v for k, v in result.features.counts().items()}}))
    if result.evaluation is not None:
        data = result.evaluation.to_json()
        if args.output:
            result.evaluation.save(Path(args.output))
        print(_format_summary(data))
    elif result.grouped is not None:
        print(json.dumps(result.grouped.counts()))
    elif result.memorised is not None:
        print(json.dumps({r: list(v) for r, v in result.memorised.per_relation().items()}))
    return 0


def _format_summary(data: dict) -> str:
    lines = [
        f"{data['model']} on {data['dataset']}: {data['n_items']} items, seeds {data['seeds']}"
    ]
    if "method" in data:
        lines[0] += f", method {data['method']['name']}"
    for cond in ("no_steering", "steer_to_context", "steer_to_memory"):
        if cond in data:
            d = data[cond]
            lines.append(
                f"  {cond:17s} EM_C {d['EM_C']:5.1f} ± {d['EM_C_std']:4.1f}   "
                f"EM_M {d['EM_M']:5.1f} ± {d['EM_M_std']:4.1f}   neither {d['neither']:5.1f}"
            )
    return "\n".join(lines)


def _check_steering_args(args: argparse.Namespace) -> None:
    """--edit-strength, --features and --saes, before the model is loaded."""
    if args.edit_strength is not None:
        checks.finite_non_negative(args.edit_strength, "--edit-strength α")
    check_steering_folders(args.features, args.saes)


def _check_evaluate_args(args: argparse.Namespace) -> None:
    """Every argument and output path of ``evaluate``, before any work."""
    checks.output_file(args.output)
    if args.predictions:
        checks.output_file(args.predictions, "--predictions")
    if not args.seeds:
        raise checks.ArgumentError("--seeds needs at least one seed")
    if args.n_items is not None:
        checks.at_least(args.n_items, 1, "--n-items")
    if args.pool_size is not None:
        checks.at_least(args.pool_size, 2, "--pool-size")
    checks.at_least(args.shots, 0, "--shots")
    if args.hyperparameters:
        try:
            json.loads(args.hyperparameters)
        except json.JSONDecodeError as e:
            raise checks.ArgumentError(f"--hyperparameters is not valid JSON: {e}") from e
    if args.sweep and not Path(args.sweep).is_file():
        raise checks.ArgumentError(
            f"--sweep {args.sweep}: no development sweep there (no such file)"
        )
    _check_steering_args(args)
    check_dataset(args.dataset)


def _evaluate(args: argparse.Namespace) -> int:
    from spare_tl.methods.spare import SpareMethod
    from spare_tl.stages.evaluation import EvaluationConfig, evaluate
    from spare_tl.stages.memorised import memorised_split

    _check_evaluate_args(args)
    model, features, saes = _load_setup(args)
    if args.edit_strength is not None:
        features = features.with_edit_strength(args.edit_strength)
    split = memorised_split(model, features, args.dataset, pool_size=args.pool_size)
    eval_items = split.test[: args.n_items] if args.n_items else split.test
    config = EvaluationConfig(
        seeds=tuple(args.seeds),
        n_shots=args.shots,
        demo_type=args.demo_type,
        demonstrations=args.demonstrations,
    )
    if args.method == "spare":
        method = SpareMethod(features, saes)
    else:
        from spare_tl.studies.baseline_setup import BaselineSetup

        setup = BaselineSetup(
            model,
            features,
            saes,
            list(split.pool),
            list(split.development),
            list(split.test),
            args.dataset,
        )
        method = setup.method(
            args.method,
            sweep=Path(args.sweep) if args.sweep else None,
            overrides=json.loads(args.hyperparameters) if args.hyperparameters else None,
        )
    from spare_tl import cache, distributed

    ranks = distributed.init()  # launched by torchrun: the seeds are split across ranks
    if ranks.distributed:
        from spare_tl.stages.sharded import evaluate_sharded

        stage = cache.stage_dir(model.cfg.model_name, f"evaluation-{args.method}-{args.demo_type}")
        result = evaluate_sharded(
            model,
            eval_items,
            split.pool,
            stage,
            method=method,
            config=config,
            dataset_name=args.dataset,
        )
        distributed.finish()
        if not ranks.is_main:
            return 0
    else:
        result = evaluate(
            model, eval_items, split.pool, method=method, config=config, dataset_name=args.dataset
        )
    result.save(Path(args.output), Path(args.predictions) if args.predictions else None)
    print(_format_summary(result.to_json()))
    return 0


def _steer(args: argparse.Namespace) -> int:
    from spare_tl.data.schema import ConflictItem
    from spare_tl.generation import greedy_generate
    from spare_tl.methods.spare import steer

    checks.non_empty(args.context, "--context")
    checks.non_empty(args.question, "--question")
    if args.demonstrations is not None:
        checks.at_least(args.demonstrations, 1, "--demonstrations (leave it out for none)")
    _check_steering_args(args)
    model, features, saes = _load_setup(args)
    if args.edit_strength is not None:
        features = features.with_edit_strength(args.edit_strength)
    head = ""
    if args.demonstrations:
        from spare_tl.data.datasets import load_dataset
        from spare_tl.data.prompts import demonstration

        pool = load_dataset("builtin")[: args.demonstrations]
        head = "".join(demonstration(d, "doo") for d in pool)
    item = ConflictItem(args.question, args.context, ("?",), args.context, ("?",))
    prompt = f"{head}context: {item.sub_context}\nquestion: {item.question}\nanswer:"
    rows = {"no steering": greedy_generate(model, [prompt], progress=False)[0]}
    for direction in ("context", "memory"):
        with steer(model, features, direction, saes):
            rows[f"steer to {direction}"] = greedy_generate(model, [prompt], progress=False)[0]
    for name, answer in rows.items():
        print(f"{name:18s} {answer}")
    return 0
