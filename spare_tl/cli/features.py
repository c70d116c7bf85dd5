"""``spare-tl features show|examples|effects``: look at the functional features.

``spare-tl features CONFIG`` (the feature-selection stage, :mod:`spare_tl.cli.commands`)
keeps working: the subcommands are recognised by their first word.

- ``spare-tl features show LAYER:LATENT [--site resid_post] [--direction context]`` prints a
  feature card as text (:mod:`spare_tl.viz.feature_card`);
- ``spare-tl features examples`` runs the feature-examples stage over the setup's SAEs;
- ``spare-tl features effects`` measures every feature's causal effect on development
  questions (:mod:`spare_tl.stages.feature_effects`).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from spare_tl import checks

SUBCOMMANDS = ("show", "examples", "effects")
DEVELOPMENT_QUESTIONS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommands' arguments on the ``features`` parser."""
    p.add_argument("target", nargs="?", help="show: LAYER:LATENT, e.g. 12:345")
    p.add_argument("--site", default="resid_post", help="show: resid_post, attn_out or mlp_out")
    p.add_argument(
        "--direction",
        choices=["context", "memory"],
        default=None,
        help="show: the feature set steering this way (default: whichever holds the feature)",
    )
    p.add_argument("--n-items", type=int, default=DEVELOPMENT_QUESTIONS, help="effects: questions")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="effects: demonstration seeds")
    p.add_argument("--batch-size", type=int, default=32, help="effects: questions per batch")
    p.add_argument("--max-new-tokens", type=int, default=12, help="effects: answer length (tokens)")
    p.add_argument("--n-text", type=int, default=2000, help="examples: general-text passages")


def dispatch(args: argparse.Namespace) -> int | None:
    """Run a ``features`` subcommand, or None when ``args.config`` is a pipeline config."""
    if args.config not in SUBCOMMANDS:
        return None
    if args.config != "show" and args.target is not None:
        raise checks.ArgumentError(f"features {args.config} takes no {args.target!r}")
    return {"show": _show, "examples": _examples, "effects": _effects}[args.config](args)


def parse_target(text: str | None) -> tuple[int, int]:
    """``LAYER:LATENT`` → (layer, latent)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if match is None:
        raise checks.ArgumentError(f"features show needs LAYER:LATENT (e.g. 12:345), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def development_questions(model, features, n: int):
    """(development questions, demonstration pool): the one place the CLI picks them."""
    from spare_tl.stages.evaluation import development_items
    from spare_tl.stages.memorised import memorised_split

    split = memorised_split(model, features, "builtin")
    return development_items(split.development, n), list(split.pool)


def _setup():
    from spare_tl.embedded import load_steering_setup

    return load_steering_setup()


def _stage_dir(model_name: str, stage: str) -> Path:
    from spare_tl import cache
    from spare_tl.embedded import EMBEDDED_MODEL, SHIPPED_ROOT

    shipped = cache.stage_dir(model_name, stage, SHIPPED_ROOT)
    if model_name == EMBEDDED_MODEL and cache.REPO_ROOT in shipped.parents:
        return shipped  # a source checkout: the committed results
    return cache.stage_dir(model_name, stage)


def _show(args: argparse.Namespace) -> int:
    from spare_tl.saes import check_site, site_hook_name
    from spare_tl.stages.feature_effects import STAGE as EFFECTS
    from spare_tl.stages.feature_effects import read_feature_effects
    from spare_tl.stages.feature_examples import load_feature_examples
    from spare_tl.stages.statistics import find_statistics
    from spare_tl.viz.feature_card import feature_card

    layer, latent = parse_target(args.target)
    check_site(args.site)
    hook = site_hook_name(layer, args.site)
    model, features, saes = _setup()
    sets = (
        [features.for_direction(args.direction)]
        if args.direction
        else [
            features,
            features.for_direction("memory"),
        ]
    )
    layer_features = next((s.layers[layer] for s in sets if layer in s.layers), None)
    if layer_features is not None and layer_features.hook_name != hook:
        layer_features = None
    name = model.cfg.model_name
    examples = None
    try:
        found = load_feature_examples(name)
        if hook in found.by_hook and latent in found.by_hook[hook].latents:
            examples = found.of(hook, latent)
    except FileNotFoundError:
        pass
    effects = None
    directory = _stage_dir(name, EFFECTS)
    if (directory / "config.json").is_file():
        effects = read_feature_effects(directory).of(layer, latent)
    sae = saes.get(hook)
    if sae is None:
        from spare_tl.embedded import DEFAULT_SAES
        from spare_tl.saes import load_saes_for_hooks

        sae = load_saes_for_hooks(model, DEFAULT_SAES, [hook])[hook]
    card = feature_card(
        layer,
        latent,
        hook_name=hook,
        statistics=find_statistics(name, layer, site=args.site),
        features=layer_features,
        examples=examples,
        effects=effects,
        model=model,
        sae=sae,
    )
    print(card.to_text(), end="")
    if examples is None:
        print(
            "  (no saved examples for this latent: `spare-tl features examples` keeps them for the functional features)"
        )
    return 0


def _examples(args: argparse.Namespace) -> int:
    from spare_tl.embedded import DEFAULT_SAES, EMBEDDED_DIR
    from spare_tl.saes import load_saes_for_hooks
    from spare_tl.stages.behaviours import STAGE as BEHAVIOURS
    from spare_tl.stages.behaviours import GroupedPrompts
    from spare_tl.stages.feature_examples import (
        STAGE,
        FeatureExamplesConfig,
        feature_examples,
        functional_latents,
        sae_training_items,
    )

    checks.at_least(args.n_text, 1, "--n-text")
    model, features, _ = _setup()
    hooks = sorted(
        (p.name for p in Path(DEFAULT_SAES).iterdir() if p.is_dir()),
        key=lambda h: int(h.split(".")[1]),
    )
    saes = load_saes_for_hooks(model, DEFAULT_SAES, hooks)
    grouped = GroupedPrompts.load(EMBEDDED_DIR / BEHAVIOURS).records
    start = time.perf_counter()
    result = feature_examples(
        model,
        saes,
        grouped,
        sae_training_items(),
        latents=functional_latents(features),
        config=FeatureExamplesConfig(n_text=args.n_text),
        directory=_stage_dir(model.cfg.model_name, STAGE),
    )
    print(f"feature examples for {len(result.by_hook)} SAEs in {time.perf_counter() - start:.0f} s")
    return 0


def _effects(args: argparse.Namespace) -> int:
    from spare_tl.stages.evaluation import EvaluationConfig
    from spare_tl.stages.feature_effects import STAGE, feature_effects

    checks.at_least(args.n_items, 1, "--n-items")
    model, features, saes = _setup()
    items, pool = development_questions(model, features, args.n_items)
    start = time.perf_counter()
    result = feature_effects(
        model,
        features,
        saes,
        items,
        pool,
        config=EvaluationConfig(
            seeds=tuple(args.seeds),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        ),
        directory=_stage_dir(model.cfg.model_name, STAGE),
    )
    print(
        f"{len(items)} development questions, seeds {args.seeds}: {time.perf_counter() - start:.0f} s"
    )
    for d, block in result.directions.items():
        t = block["target"]
        print(
            f"to {d}: no steering {t} {block['no_steering'][t]:.1f}, full set "
            f"{block['full'][t]:.1f}, top 3 {block['top']} {block['top_shares'][t]:.1f}"
        )
        for row in block["features"][:5]:
            print(
                f"  L{row['layer']}:{row['latent']} ({row['role']} feature, {row['edit']}) "
                f"gain {row['gain']:+.1f}, neither {row['neither_added']:+.1f}, "
                f"full set without it {-row['loss_without']:+.1f}"
            )
    return 0
