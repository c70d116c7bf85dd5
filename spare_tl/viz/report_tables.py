"""The report's HTML tables, each built from typed data (rows, results, JSON of the stages).

Nothing here reads Markdown: the baselines' table comes from the rows of
:func:`spare_tl.studies.baselines.table_rows` (``table.json``'s ``rows``), the probe study's tables
from its :class:`~spare_tl.studies.probes.ProbeResults` and :class:`~spare_tl.studies.probes.ConditionalResult`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from spare_tl.features import FunctionalFeatures
from spare_tl.methods.spare import DIRECTIONS
from spare_tl.studies.probes import CONDITIONS as GATE_CONDITIONS
from spare_tl.studies.probes import (
    GATE_CONDITION_NAMES,
    ConditionalResult,
    ConflictProbe,
    ProbeResults,
)
from spare_tl.viz.plotting import CONDITION_NAMES

__all__ = [
    "baseline_rows",
    "baselines_html",
    "conditional_html",
    "counts_html",
    "evaluation_html",
    "latents_html",
    "probe_quality_html",
    "table_html",
]


def table_html(
    header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: Collection[int] = ()
) -> str:
    """An HTML table of plain-text cells (escaped); columns in ``left`` are left-aligned."""

    def row(cells: Sequence[Any], tag: str) -> str:
        out = ""
        for i, c in enumerate(cells):
            align = " class='left'" if i in left else ""
            out += f"<{tag}{align}>{html.escape(str(c), quote=False)}</{tag}>"
        return f"<tr>{out}</tr>"

    return "<table>" + row(header, "th") + "".join(row(r, "td") for r in rows) + "</table>"


def _pm(mean: Any, std: Any, digits: int = 1) -> str:
    """``mean ± std``; ``–`` for no mean, ``—`` for NaN (a probe that did not run)."""
    if mean is None:
        return "–"
    if isinstance(mean, float) and math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


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
    rows = ""
    for cond, label in CONDITION_NAMES.items():
        if cond not in data:
            continue
        s = data[cond]
        rows += (
            f"<tr><td>{label}</td><td>{_pm(s.get('EM_C'), s.get('EM_C_std'))}</td>"
            f"<td>{_pm(s.get('EM_M'), s.get('EM_M_std'))}</td>"
            f"<td>{_pm(s.get('neither'), None)}</td></tr>"
        )
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
    out = (
        f"<h3>{e(name)}</h3><p class='meta'>{meta}</p>"
        "<table><tr><th>condition</th><th>EM_C (%)</th><th>EM_M (%)</th><th>neither (%)</th>"
        f"</tr>{rows}</table>"
    )
    trans = data.get("transitions") or {}
    if trans:
        cells = "".join(
            f"<tr><td>{e(k)}</td><td>{_pm(v.get('mean'), v.get('std'))}</td></tr>"
            for k, v in trans.items()
        )
        out += f"<table><tr><th>transition</th><th>% (mean ± std)</th></tr>{cells}</table>"
    return out


def counts_html(features: FunctionalFeatures) -> str:
    """A feature set's settings and its context / memory features per layer."""
    rows = "".join(
        f"<tr><td>{layer}</td><td>{c}</td><td>{m}</td></tr>"
        for layer, (c, m) in features.counts().items()
    )
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
        "<table><tr><th>layer</th><th>context features</th><th>memory features</th></tr>"
        f"{rows}</table>"
    )


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


def baseline_rows(
    baselines: Mapping[str, Any],
) -> tuple[list[Mapping[str, Any]], dict[str, Any]]:
    """The rows of :func:`spare_tl.studies.baselines.table_rows` and the protocol (model, dataset,
    n_items, demo_type, seeds) from ``table.json`` or a method → result mapping."""
    if isinstance(baselines.get("rows"), list):  # table.json
        protocol = dict(baselines.get("protocol") or {})
        if baselines.get("model") is not None:
            protocol["model"] = baselines["model"]
        return list(baselines["rows"]), protocol
    from spare_tl.studies.baselines import table_rows  # loads the harness: only for raw results

    first = next(iter(baselines.values()))
    keys = ("model", "dataset", "n_items", "demo_type", "seeds")
    return table_rows(baselines), {k: first[k] for k in keys if k in first}


def _settings(hyperparameters: Mapping[str, Any]) -> str:
    """``layers 12-15, proportion 0.2; alpha -0.25``: to context; to memory."""
    parts = []
    for direction in DIRECTIONS:
        hp = hyperparameters.get(direction)
        if not hp:
            continue
        items = []
        for k, v in hp.items():
            if k == "layers" and isinstance(v, list) and v == list(range(v[0], v[-1] + 1)):
                v = f"{v[0]}-{v[-1]}" if len(v) > 1 else str(v[0])
            items.append(f"{k} {v}")
        parts.append(", ".join(items))
    return "; ".join(parts)


def _transition(t: Mapping[str, Any] | None) -> str:
    return _pm(t["mean"], t["std"]) if t else "–"


def baselines_html(baselines: Mapping[str, Any]) -> str:
    """SpARE against the baselines: EM_C steering to context, EM_M steering to memory,
    transitions and cost per method, with the protocol they ran under."""
    rows, protocol = baseline_rows(baselines)
    if not rows:
        raise ValueError("no methods in the baselines")
    body = [
        [
            f"{r['method']}{'' if r['inference_time'] else ' *'}",
            _pm(r["EM_C"], r["EM_C_std"]),
            _pm(r["EM_M"], r["EM_M_std"]),
            _transition(r.get("EM_C->M")),
            _transition(r.get("EM_M->C")),
            f"{r['extra_forward_passes_per_token']:g}",
            f"{r['time_relative_to_no_steering']:.2f}",
            _settings(r["hyperparameters"]) or "–",
        ]
        for r in rows
    ]
    header = [
        "method",
        "EM_C, to context",
        "EM_M, to memory",
        "EM_C→M",
        "EM_M→C",
        "extra passes / token",
        "time / item (× none)",
        "settings (to context; to memory)",
    ]
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
    return f"{table_html(header, body, left={0, 7})}\n<p class='meta'>{caption}</p>"


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
    body = []
    for layer in sorted(set(resid.layers) | set(sae.layers if sae else {})):
        r = resid.layers.get(layer)
        s = sae.layers.get(layer) if sae is not None else None
        mark = " (best residual)" if layer == best_r else ""
        mark += " (best SAE)" if layer == best_s else ""
        body.append(
            [
                f"{layer}{mark}",
                _pm(r.accuracy_mean, r.accuracy_std, 3) if r else "—",
                _pm(r.auroc_mean, r.auroc_std, 3) if r else "—",
                _pm(s.accuracy_mean, s.accuracy_std, 3) if s else "—",
                _pm(s.auroc_mean, s.auroc_std, 3) if s else "—",
            ]
        )
    header = ["layer", "residual accuracy", "residual AUROC", "SAE accuracy", "SAE AUROC"]
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
    return f"{table_html(header, body)}\n<p class='meta'>{caption}</p>"


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
    return table_html(header, body, left={8})


def conditional_html(conditional: ConditionalResult | Mapping[str, Any]) -> str:
    """Steering only when the probe flags a conflict, against never and always steering, on
    conflict and no-conflict rows; what the probe flags and what it costs."""
    data = conditional.to_json() if hasattr(conditional, "to_json") else conditional
    body = [
        [
            name,
            GATE_CONDITION_NAMES[cond],
            _pm(data[rows][cond]["EM_M"], data[rows][cond]["EM_M_std"]),
            _pm(data[rows][cond]["EM_C"], data[rows][cond]["EM_C_std"]),
            f"{data[rows][cond]['neither']:.1f}",
        ]
        for rows, name in (("conflict", "conflict"), ("no_conflict", "no conflict"))
        for cond in GATE_CONDITIONS
    ]
    header = ["rows", "condition", "EM_M (memory answer)", "EM_C (context answer)", "neither"]
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
    return f"{table_html(header, body, left={0, 1})}\n<p class='meta'>{caption}</p>"
