"""The report's HTML sections around the tables of :mod:`spare_tl.viz.tables`, each built
from typed data (rows, results, JSON of the stages).

Nothing here reads Markdown: the baselines' table comes from the rows of
:func:`spare_tl.studies.baselines.table_rows` (``table.json``'s ``rows``), the probe study's tables
from its :class:`~spare_tl.studies.probes.ProbeResults` and :class:`~spare_tl.studies.probes.ConditionalResult`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from spare_tl.features import FunctionalFeatures
from spare_tl.studies.probes import ConditionalResult, ConflictProbe, ProbeResults
from spare_tl.viz.plotting import CONDITION_NAMES
from spare_tl.viz.tables import (
    Table,
    baseline_rows,
    baselines_table,
    conditional_table,
    pm,
    probe_quality_table,
)

__all__ = [
    "baselines_html",
    "conditional_html",
    "counts_html",
    "evaluation_html",
    "latents_html",
    "probe_quality_html",
]


# --------------------------------------------------------------------------------------
# Steering results and functional features
# --------------------------------------------------------------------------------------


def _feature_set_text(features: Mapping[str, Any], k_name: str, alpha_name: str) -> str:
    """Layers, K and α of a saved feature-set summary, HTML-escaped."""
    e = html.escape
    return (
        f"layers {e(str(features.get('layers')))}, {k_name} = "
        f"{e(str(features.get('proportion')))}, {alpha_name} = "
        f"{e(str(features.get('edit_strength')))}"
    )


def evaluation_html(name: str, data: Mapping[str, Any]) -> str:
    """One evaluation result's JSON: EM per condition, its protocol and features, transitions."""
    e = html.escape
    body = [
        [
            label,
            pm(data[cond].get("EM_C"), data[cond].get("EM_C_std")),
            pm(data[cond].get("EM_M"), data[cond].get("EM_M_std")),
            pm(data[cond].get("neither")),
        ]
        for cond, label in CONDITION_NAMES.items()
        if cond in data
    ]
    meta = ", ".join(
        f"{k}: {e(str(data[k]))}" for k in ("model", "dataset", "n_items", "demo_type") if k in data
    )
    if data.get("seeds"):
        meta += f", seeds: {e(str(list(data['seeds'])))}"
    feats = data.get("features")
    if isinstance(feats, Mapping):
        meta += "<br>" + _feature_set_text(feats, "proportion K", "edit strength α")
        if feats.get("edit_strength_to_memory") is not None:
            meta += f" (to memory: {e(str(feats['edit_strength_to_memory']))})"
        mem = feats.get("to_memory")
        if isinstance(mem, Mapping):
            meta += " (to context); to memory: " + _feature_set_text(mem, "K", "α")
    header = ("condition", "EM_C (%)", "EM_M (%)", "neither (%)")
    out = f"<h3>{e(name)}</h3><p class='meta'>{meta}</p>" + Table(header, body).html()
    trans = data.get("transitions") or {}
    if trans:
        cells = [[k, pm(v.get("mean"), v.get("std"))] for k, v in trans.items()]
        out += Table(("transition", "% (mean ± std)"), cells).html()
    return out


def counts_html(features: FunctionalFeatures) -> str:
    """A feature set's settings and its context / memory features per layer."""
    rows = [[layer, c, m] for layer, (c, m) in features.counts().items()]
    a_mem = features.edit_strength_to_memory
    strength = f"{features.edit_strength:g}" + (
        f" (to memory: {a_mem:g})" if a_mem is not None else ""
    )
    if features.to_memory is not None:
        m = features.to_memory
        strength += (
            f" (to context); steering to memory uses its own set: layers {sorted(m.layers)}, "
            f"K = {m.proportion:g}, α = {m.strength('memory'):g}, features per layer "
            f"{m.counts()}"
        )
    return (
        f"<p class='meta'>model {html.escape(features.model_name)}, proportion K = "
        f"{features.proportion:g}, edit strength α = {strength}</p>"
        + Table(("layer", "context features", "memory features"), rows).html()
    )


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


def baselines_html(baselines: Mapping[str, Any]) -> str:
    """SpARE against the baselines: EM_C steering to context, EM_M steering to memory,
    transitions and cost per method, with the protocol they ran under."""
    rows, protocol = baseline_rows(baselines)
    table = baselines_table(rows)
    e = html.escape
    p = protocol
    where = f"{e(str(p['model']))}, " if p.get("model") else ""
    caption = (
        f"{where}{e(str(p.get('dataset', '?')))} dataset: {e(str(p.get('n_items', '?')))} "
        f"held-out memorised questions, {e(str(p.get('demo_type', '?')))} demonstrations, "
        f"seeds {e(str(p.get('seeds', '?')))}, mean ± std over seeds (%). <code>none</code>: "
        "EM_C and EM_M without steering. Settings chosen on the development (pool) questions "
        "only (<code>cache_data/&lt;model&gt;/baselines/sweep-*.json</code>). * ICL changes the "
        "demonstrations (dss / dso) and is not an inference-time method. Time: wall time per "
        "item relative to no steering in the same run; task vectors and ActAdd's mean "
        "difference are computed once beforehand, CAD runs a second (context-free) prompt pass "
        "per item."
    )
    return f"{table.html()}\n<p class='meta'>{caption}</p>"


# --------------------------------------------------------------------------------------
# The conflict-probe study
# --------------------------------------------------------------------------------------


def probe_quality_html(
    resid: ProbeResults, sae: ProbeResults | None = None, probe: ConflictProbe | None = None
) -> str:
    """Probe accuracy and AUROC per layer (residual stream and SAE latents), the best layers
    and the deployed probe."""
    best_r = resid.best_layer()
    best_s = sae.best_layer() if sae is not None and sae.layers else None
    cfg = resid.config
    e = html.escape
    caption = (
        f"{e(resid.model_name)}: conflict (<code>sub_context</code>) vs no conflict "
        f"(<code>org_context</code>) prompts, {e(str(cfg.get('n_questions')))} questions "
        f"({e(str(cfg.get('n_prompts')))} prompts), held-out questions "
        f"{e(str(cfg.get('test_fraction')))}, mean ± std over split seeds "
        f"{e(str(cfg.get('seeds')))}. Probe: standardise + L1 logistic regression, C by "
        f"question-grouped inner CV from {e(str(cfg.get('Cs')))}. Best residual layer {best_r} "
        f"(AUROC {resid.layers[best_r].auroc_mean:.3f})"
    )
    if best_s is not None and sae is not None:
        caption += f", best SAE layer {best_s} (AUROC {sae.layers[best_s].auroc_mean:.3f})."
    else:
        caption += "."
    if probe is not None:
        caption += (
            f" Deployed probe: layer {probe.layer} (the best residual layer at or before the "
            f"first edited layer), threshold {probe.threshold}, C {probe.C}."
        )
    return f"{probe_quality_table(resid, sae).html()}\n<p class='meta'>{caption}</p>"


def latents_html(latents: Mapping[int, Mapping[str, Any]], shown: int = 5) -> str:
    """One row per layer of ``latents.json``: overlaps of the conflict latents with SpARE's
    functional features, against chance."""
    body = []
    for layer, lat in sorted(latents.items()):
        ov = lat["overlap"]
        ctx = {d["latent"] for d in lat["context_features"]}
        mem = {d["latent"] for d in lat["memory_features"]}
        n = max(len(lat["top_by_weight"]), len(lat["top_by_mutual_information"]))
        top = ", ".join(
            f"{d['latent']}"
            + (" (C)" if d["latent"] in ctx else " (M)" if d["latent"] in mem else "")
            for d in lat["top_by_weight"][:shown]
        )
        body.append(
            [
                layer,
                n,
                f"{len(ctx)} + {len(mem)}",
                f"{ov['weight&context']} / {ov['weight&memory']}",
                f"{ov['mutual_information&context']} / {ov['mutual_information&memory']}",
                f"{lat['expected_overlap_by_chance']:.2f}",
                lat["n_active"],
                lat["n_nonzero_weights"],
                top or "–",
            ]
        )
    header = [
        "layer",
        "top n",
        "context + memory features",
        "top n by |probe weight| ∩ context / memory features",
        "top n by MI with the conflict label ∩ context / memory features",
        "overlap expected by chance",
        "active latents",
        "non-zero probe weights",
        f"top {shown} by |probe weight| (C / M: context / memory feature)",
    ]
    return Table(header, body, left={8}).html()


def conditional_html(conditional: ConditionalResult | Mapping[str, Any]) -> str:
    """Steering only when the probe flags a conflict, against never and always steering, on
    conflict and no-conflict rows; what the probe flags and what it costs."""
    data = conditional.to_json() if hasattr(conditional, "to_json") else conditional
    pe, ch = data["probe_on_eval"], data["checks"]
    e = html.escape
    caption = (
        f"Conditional steering to {e(str(data['direction']))} (α = {data['edit_strength']}, "
        f"layers {e(str(data['feature_layers']))}, probe at layer {data['probe']['layer']}): "
        f"{data['n_items']} held-out questions, each with a conflicting and a consistent "
        f"context, {data['n_shots']} {e(str(data['demo_type']))} demonstrations, seeds "
        f"{e(str(data['seeds']))}, mean ± std over seeds (%). The probe flags "
        f"{pe['flagged_conflict']:.1f} % of conflict rows and "
        f"{pe['flagged_no_conflict']:.1f} % of no-conflict rows (AUROC "
        f"{pe['auroc']:.3f}). No-conflict accuracy (EM_M) changes by "
        f"{-ch['no_conflict_accuracy_drop_conditional']:+.1f} points under conditional "
        f"steering ({-ch['no_conflict_accuracy_drop_always']:+.1f} when always steering); "
        f"{e(str(ch['target_metric_on_conflict_rows']))} on conflict rows changes by "
        f"{ch['conflict_gain_conditional']:+.1f} (conditional) and "
        f"{ch['conflict_gain_always']:+.1f} (always)."
    )
    return f"{conditional_table(data).html()}\n<p class='meta'>{caption}</p>"
