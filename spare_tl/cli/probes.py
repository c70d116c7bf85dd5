"""``spare-tl probes``: the knowledge-conflict probe study on the embedded default.

Runs :func:`spare_tl.studies.probes.run_probe_study` (probe data, per-layer probes, the
deployed conflict probe, conflict latents, conditional steering; JSON under
``cache_data/<model>/probes/``), writes its Markdown table to ``probes.md`` beside the JSON and
prints it. The Markdown is an output only: the report and ``spare-tl docs`` read the JSON.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spare_tl import checks
from spare_tl.cli.args import add_dtype_argument, check_dataset, check_steering_folders
from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
from spare_tl.layer_spec import parse_layers

if TYPE_CHECKING:
    from spare_tl.methods.conflict_probe import ConflictProbe
    from spare_tl.studies.probe_training import ConflictLatents, ProbeResults
    from spare_tl.studies.probes import ConditionalResult, ProbeStudy

__all__ = ["probes_table", "register", "study_table"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``probes``."""
    run = sub.add_parser(
        "probes",
        help="the knowledge-conflict probe study on the embedded default",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    run.add_argument("--layers", nargs="+", default=["6-20"], help="e.g. 6-20 or 6 8 10-12")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run.add_argument("--test-fraction", type=float, default=0.25)
    run.add_argument("--n-shots", type=int, default=3)
    run.add_argument("--demo-type", default="doo", choices=["doo", "dss", "dso"])
    run.add_argument("--n-demo-sets", type=int, default=1)
    run.add_argument("--probe-layer", type=int, default=None)
    run.add_argument("--threshold", type=float, default=0.5)
    run.add_argument("--top-n", type=int, default=20)
    run.add_argument("--n-items", type=int, default=100)
    run.add_argument(
        "--probe-items",
        type=int,
        default=0,
        help="held-out questions (from the end of the held-out list) added to the probe data",
    )
    run.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--direction", default="memory", choices=["memory", "context"])
    run.add_argument("--no-conditional", action="store_true")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--dataset", default="builtin")
    run.add_argument("--features", default=str(DEFAULT_FEATURES))
    run.add_argument("--saes", default=str(DEFAULT_SAES))
    run.add_argument("--figure", default=None, help="also write the figure as HTML here")
    add_dtype_argument(run)
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(func=_run)


def _available_sae_layers(saes_dir: Path) -> list[int]:
    from spare_tl.saes import CFG, folder_site, sae_layer_from_folder

    root = Path(saes_dir)
    if not root.is_dir():
        return []
    return sorted(
        sae_layer_from_folder(p)
        for p in root.iterdir()
        if (p / CFG).exists() and folder_site(p) == "resid_post"
    )


def _run(args: argparse.Namespace) -> int:
    import torch

    from spare_tl.saes import load_saes_for_layers
    from spare_tl.stages.memorised import memorised_split
    from spare_tl.studies.probes import run_probe_study

    layers = parse_layers(args.layers)
    if args.figure:
        checks.output_file(args.figure, "--figure")
    check_steering_folders(args.features, args.saes)
    check_dataset(args.dataset)
    torch.set_grad_enabled(False)
    start = time.time()
    model, features, saes = load_steering_setup(args.features, args.saes, dtype=args.dtype)
    have = [k for k in _available_sae_layers(Path(args.saes)) if k in layers]
    saes = {**load_saes_for_layers(model, args.saes, have), **saes}
    split = memorised_split(model, features, args.dataset, progress=not args.quiet)
    study = run_probe_study(
        model,
        features,
        saes,
        split.pool,
        split.test,
        layers=layers,
        seeds=args.seeds,
        test_fraction=args.test_fraction,
        n_shots=args.n_shots,
        demo_type=args.demo_type,
        n_demo_sets=args.n_demo_sets,
        probe_layer=args.probe_layer,
        threshold=args.threshold,
        top_n=args.top_n,
        conditional=not args.no_conditional,
        n_items=args.n_items,
        probe_items=args.probe_items,
        eval_seeds=args.eval_seeds,
        direction=args.direction,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    table = study_table(study)
    layer_text = " ".join(args.layers)
    table += (
        f"\nRegenerate: `spare-tl probes --layers {layer_text} --seeds "
        f"{' '.join(map(str, args.seeds))} --n-items {args.n_items} "
        f"--probe-items {args.probe_items} --eval-seeds "
        f"{' '.join(map(str, args.eval_seeds))}` ({time.time() - start:.0f} s on the 2-core CPU)."
    )
    (study.directory / "probes.md").write_text(table + "\n")
    if args.figure:
        from spare_tl.viz.figures_probes import probe_quality_by_layer

        probe_quality_by_layer(study.resid, study.sae).write_html(args.figure)
    print(table)
    print("docs/results.md is regenerated from the saved JSON by `spare-tl docs`")
    return 0


# --------------------------------------------------------------------------------------
# The Markdown table (printed and written to probes.md; never read back)
# --------------------------------------------------------------------------------------


def study_table(study: ProbeStudy) -> str:
    """The Markdown table of a :class:`~spare_tl.studies.probes.ProbeStudy`."""
    return probes_table(
        study.resid,
        study.sae,
        probe=study.probe,
        latents=study.latents,
        conditional=study.conditional,
    )


def probes_table(
    resid: ProbeResults,
    sae: ProbeResults | None = None,
    *,
    probe: ConflictProbe | None = None,
    latents: Mapping[int, ConflictLatents] | None = None,
    conditional: ConditionalResult | Mapping[str, Any] | None = None,
) -> str:
    """Markdown: probe quality by layer, the deployed probe, latents, conditional steering."""
    from spare_tl.viz.tables import conditional_table, probe_quality_table

    best_r = resid.best_layer()
    best_s = sae.best_layer() if sae is not None and sae.layers else None
    lines = [probe_quality_table(resid, sae).markdown()]
    cfg = resid.config
    lines += [
        "",
        f"{resid.model_name}: conflict (`sub_context`) vs no conflict (`org_context`) prompts, "
        f"{cfg.get('n_questions')} questions ({cfg.get('n_prompts')} prompts), held-out "
        f"questions {cfg.get('test_fraction')}, mean ± std over split seeds {cfg.get('seeds')}. "
        "Probe: standardise + L1 logistic regression, C by question-grouped inner CV "
        f"from {cfg.get('Cs')}. Best residual layer {best_r} "
        f"(AUROC {resid.layers[best_r].auroc_mean:.3f})"
        + (
            f", best SAE layer {best_s} (AUROC {sae.layers[best_s].auroc_mean:.3f})."
            if best_s is not None and sae is not None
            else "."
        ),
    ]
    if probe is not None:
        lines.append(
            f"Deployed probe: layer {probe.layer} (the best residual layer at or before the "
            f"first edited layer), threshold {probe.threshold}, C {probe.C}."
        )
    if latents:
        lines.append("")
        for layer, lat in sorted(latents.items()):
            ov = lat.overlap()
            n = max(len(lat.top_by_weight), len(lat.top_by_mutual_information))
            lines.append(
                f"- layer {layer} SAE latents: top {n} by |probe weight| ∩ context / memory "
                f"features: {ov['weight&context']} / {ov['weight&memory']}; top {n} by MI "
                f"with the conflict label ∩ context / memory features: "
                f"{ov['mutual_information&context']} / {ov['mutual_information&memory']} "
                f"({len(lat.context_features)} + {len(lat.memory_features)} functional "
                f"features; {lat.expected_overlap(n):.2f} expected by chance)."
            )
    if conditional is not None:
        data = conditional.to_json() if hasattr(conditional, "to_json") else conditional
        lines += ["", conditional_table(data).markdown()]
        pe, ch = data["probe_on_eval"], data["checks"]
        lines += [
            "",
            f"Conditional steering to {data['direction']} (α = {data['edit_strength']}, "
            f"layers {data['feature_layers']}, probe at layer {data['probe']['layer']}): "
            f"{data['n_items']} held-out questions, each with a conflicting and a consistent "
            f"context, {data['n_shots']} {data['demo_type']} demonstrations, seeds "
            f"{data['seeds']}, mean ± std over seeds (%). The probe flags "
            f"{pe['flagged_conflict']:.1f} % of conflict rows and "
            f"{pe['flagged_no_conflict']:.1f} % of no-conflict rows (AUROC "
            f"{pe['auroc']:.3f}). No-conflict accuracy (EM_M) changes by "
            f"{-ch['no_conflict_accuracy_drop_conditional']:+.1f} points under conditional "
            f"steering ({-ch['no_conflict_accuracy_drop_always']:+.1f} when always steering); "
            f"{ch['target_metric_on_conflict_rows']} on conflict rows changes by "
            f"{ch['conflict_gain_conditional']:+.1f} (conditional) and "
            f"{ch['conflict_gain_always']:+.1f} (always).",
        ]
    return "\n".join(lines)
