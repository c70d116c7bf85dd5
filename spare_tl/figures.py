"""Plotly figures of every SpARE stage, in the paper's vocabulary.

Each function takes the library's objects (not paths) and returns a ``plotly`` ``Figure``:
interactive in Jupyter, saveable with ``fig.write_html(path)``; :mod:`spare_tl.report`
puts them on one self-contained page.

- :func:`layerwise_mutual_information`: total MI and cumulative MI of the top latents per
  layer, and how many context / memory features proportion K selects (the layer-wise view);
- :func:`mutual_information_scatter`: MI against expectation E, one point per latent;
- :func:`latent_activation_distribution`: one latent's codes by behaviour group;
- :func:`steering_results`: EM_C / EM_M by condition (mean ± std over seeds);
- :func:`steering_sweep` and :func:`layer_steering_effect`: sweeps over α, K and layers;
- :func:`behaviour_table`: the behaviour of grouped prompts by demonstration type and shots;
- :func:`method_comparison`: SpARE against the baselines (EM_C / EM_M steered each way);
- :func:`steerability_scan`: where a last-position patch steers the model, beside the
  layer-wise mutual information.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from torch import Tensor

from spare_tl.features import LayerFeatures, select_functional_features

__all__ = [
    "COLOURS",
    "CONDITION_NAMES",
    "StatisticsLike",
    "behaviour_shares",
    "behaviour_table",
    "latent_activation_distribution",
    "layer_steering_effect",
    "layerwise_mutual_information",
    "layerwise_summary",
    "mutual_information_scatter",
    "steering_results",
    "steerability_scan",
    "steering_sweep",
]

COLOURS = {
    "context": "#1f77b4",
    "memory": "#d62728",
    "neither": "#9a9a9a",
    "other": "#c7c7c7",
    "total": "#7f7f7f",
}
CONDITION_NAMES = {
    "no_steering": "no steering",
    "steer_to_context": "steer to context",
    "steer_to_memory": "steer to memory",
}
DEMO_TYPE_ORDER = ("dss", "dso", "doo")
DEMO_TYPE_NAMES = {
    "dss": "dss (follow context)",
    "dso": "dso (follow memory)",
    "doo": "doo (no conflict)",
}
AXIS_NAMES = {
    "edit_strength": "edit strength α",
    "proportion": "proportion K",
    "layer": "layer",
}
TEMPLATE = "plotly_white"


class StatisticsLike(Protocol):
    """Anything with per-latent mutual information and expectation (both LayerStatistics)."""

    mutual_information: Tensor
    expectation: Tensor


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _clean_mi(mi: Tensor) -> Tensor:
    return mi.detach().cpu().double().nan_to_num(0.0).clamp_min(0.0)


def _layout(fig: go.Figure, title: str, **kwargs: Any) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template=TEMPLATE,
        legend={
            "orientation": "h",
            "yref": "container",
            "yanchor": "bottom",
            "y": 0.0,
            "x": 0.0,
            "traceorder": "normal",
        },
        margin={"t": 80, "l": 70, "r": 20, "b": 130},
        **kwargs,
    )
    return fig


# --------------------------------------------------------------------------------------
# Feature statistics
# --------------------------------------------------------------------------------------


def layerwise_summary(
    statistics: Mapping[int, StatisticsLike],
    *,
    proportion: float = 0.07,
    top_k: Sequence[int] = (16, 128, 1024),
) -> list[dict[str, Any]]:
    """Per layer: total MI, cumulative MI of the top-k latents, and the features K selects."""
    rows = []
    for layer in sorted(statistics):
        s = statistics[layer]
        mi = _clean_mi(s.mutual_information)
        ctx, mem = select_functional_features(mi, s.expectation, proportion)
        ranked = torch.sort(mi, descending=True).values
        rows.append(
            {
                "layer": int(layer),
                "d_sae": int(mi.numel()),
                "total_mutual_information": float(mi.sum()),
                "top_mutual_information": {int(k): float(ranked[:k].sum()) for k in top_k},
                "nonzero_mutual_information": int((mi > 0).sum()),
                "context_features": int(ctx.numel()),
                "memory_features": int(mem.numel()),
            }
        )
    return rows


def layerwise_mutual_information(
    statistics: Mapping[int, StatisticsLike],
    *,
    proportion: float = 0.07,
    top_k: Sequence[int] = (16, 128, 1024),
    highlight_layers: Sequence[int] = (),
    title: str | None = None,
) -> go.Figure:
    """The layer-wise view: where does the behaviour signal live, and what K selects there.

    Top panel: the layer's total mutual information Σ_i I(Z_i; Y) (bars) and the cumulative MI
    of its ``top_k`` latents (lines). Bottom panel: the number of context features (E > 0) and
    memory features (E < 0) selected at proportion K. ``highlight_layers`` shades layers (e.g.
    the ones steered).
    """
    if not statistics:
        raise ValueError("no layers to plot: pass a mapping layer -> statistics")
    rows = layerwise_summary(statistics, proportion=proportion, top_k=top_k)
    layers = [r["layer"] for r in rows]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        row_heights=[0.6, 0.4],
        subplot_titles=(
            "mutual information with the behaviour (context vs memory)",
            f"functional features selected at proportion K = {proportion:g}",
        ),
    )
    fig.add_trace(
        go.Bar(
            x=layers,
            y=[r["total_mutual_information"] for r in rows],
            name="total MI (all latents)",
            marker_color=COLOURS["total"],
            opacity=0.55,
            customdata=[[r["nonzero_mutual_information"], r["d_sae"]] for r in rows],
            hovertemplate=(
                "layer %{x}<br>total mutual information %{y:.4g}<br>"
                "latents with MI > 0: %{customdata[0]} of %{customdata[1]}<extra></extra>"
            ),
        ),
        row=1,
        col=1,
    )
    for i, k in enumerate(top_k):
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[r["top_mutual_information"][int(k)] for r in rows],
                mode="lines+markers",
                name=f"cumulative MI of the top {k} latents",
                line={"width": 2, "dash": ("solid", "dash", "dot", "dashdot")[i % 4]},
                hovertemplate=(
                    f"layer %{{x}}<br>cumulative MI of the top {k} latents %{{y:.4g}}"
                    "<extra></extra>"
                ),
            ),
            row=1,
            col=1,
        )
    for group in ("context", "memory"):
        fig.add_trace(
            go.Bar(
                x=layers,
                y=[r[f"{group}_features"] for r in rows],
                name=f"{group} features",
                marker_color=COLOURS[group],
                hovertemplate=(
                    f"layer %{{x}}<br>%{{y}} {group} features at K = {proportion:g}<extra></extra>"
                ),
            ),
            row=2,
            col=1,
        )
    for layer in highlight_layers:
        fig.add_vrect(
            x0=layer - 0.5,
            x1=layer + 0.5,
            fillcolor="#ffd54f",
            opacity=0.35,
            line_width=0,
            layer="below",
        )
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="mutual information (nats, log)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="selected features", row=2, col=1)
    fig.update_xaxes(title_text="layer", row=2, col=1, dtick=1 if len(layers) < 40 else None)
    return _layout(fig, title or "Mutual information per layer", height=660)


def mutual_information_scatter(
    statistics: StatisticsLike,
    *,
    features: LayerFeatures | None = None,
    proportion: float | None = None,
    context_activations: Float[Tensor, " d_sae"] | None = None,
    memory_activations: Float[Tensor, " d_sae"] | None = None,
    top_n: int = 2000,
    layer: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Mutual information against expectation E, one point per latent.

    Only latents with MI > 0 are drawn, at most ``top_n`` of them by MI, plus every selected
    feature. Context / memory features come from ``features`` or, if not given, from the
    selection at ``proportion``. Hover shows z̄_C and z̄_M when known (from the arguments, the
    statistics or the features).
    """
    mi = _clean_mi(statistics.mutual_information)
    expectation = statistics.expectation.detach().cpu().double()
    if features is not None:
        ctx_ids, mem_ids = features.context_features, features.memory_features
    elif proportion is not None:
        ctx_ids, mem_ids = select_functional_features(mi, expectation, proportion)
    else:
        ctx_ids = mem_ids = torch.zeros(0, dtype=torch.long)
    z_c = context_activations
    z_m = memory_activations
    for source in (statistics, features):
        if z_c is None and source is not None:
            z_c = getattr(source, "context_activations", None)
        if z_m is None and source is not None:
            z_m = getattr(source, "memory_activations", None)
    have_z = z_c is not None and z_m is not None

    order = torch.argsort(mi, descending=True, stable=True)
    shown = order[mi[order] > 0][:top_n]
    selected = torch.cat([ctx_ids.long(), mem_ids.long()])
    shown = torch.unique(torch.cat([shown, selected]))
    role = torch.zeros(mi.numel(), dtype=torch.int8)
    role[ctx_ids.long()] = 1
    role[mem_ids.long()] = 2

    fig = go.Figure()
    for code, name, colour, size in (
        (0, "other latents", COLOURS["other"], 5),
        (1, "context features", COLOURS["context"], 7),
        (2, "memory features", COLOURS["memory"], 7),
    ):
        ids = shown[role[shown] == code]
        if code == 0 and ids.numel() == 0:
            continue
        custom = [ids.numpy()]
        hover = "latent %{customdata[0]}<br>mutual information %{y:.4g}<br>expectation E %{x:.4g}"
        if have_z:
            custom += [_np(z_c)[ids.numpy()], _np(z_m)[ids.numpy()]]
            hover += "<br>z̄_C (use context) %{customdata[1]:.4g}<br>z̄_M (use memory) %{customdata[2]:.4g}"
        fig.add_trace(
            go.Scatter(
                x=expectation[ids].numpy(),
                y=mi[ids].numpy(),
                mode="markers",
                name=f"{name} ({ids.numel()})",
                marker={"color": colour, "size": size, "opacity": 0.8},
                customdata=np.stack(custom, axis=1),
                hovertemplate=hover + f"<extra>{name}</extra>",
            )
        )
    fig.add_vline(x=0, line_width=1, line_color="#888")
    where = f" at layer {layer}" if layer is not None else ""
    k_text = f", K = {proportion:g}" if features is None and proportion is not None else ""
    fig.update_xaxes(title_text="expectation E = mean(z | context) − mean(z | memory)")
    fig.update_yaxes(title_text="mutual information I(Z; Y) (nats)")
    return _layout(
        fig,
        title or f"Mutual information against expectation{where}{k_text}",
        height=520,
    )


def latent_activation_distribution(
    codes: Float[Tensor, "n d_sae"] | Float[Tensor, " n"],
    labels: Int[Tensor, " n"] | Sequence[str],
    latent: int | None = None,
    *,
    layer: int | None = None,
    nbins: int = 40,
    title: str | None = None,
) -> go.Figure:
    """Histogram of one latent's activation over the use-context and use-memory prompts.

    ``codes`` is either the SAE codes [n, d_sae] (then ``latent`` picks the column) or the
    latent's activations [n]. ``labels`` are 1 / 0 (context / memory) or behaviour names.
    """
    if codes.ndim == 2 and latent is None:
        raise ValueError("codes are [n, d_sae]: say which latent to plot")
    values = codes if codes.ndim == 1 else codes[:, int(latent)]
    names = _label_names(labels)
    if len(names) != values.shape[0]:
        raise ValueError(f"{values.shape[0]} activations but {len(names)} labels")
    v = _np(values)
    fig = go.Figure()
    for group in ("context", "memory", "neither"):
        mask = np.array([n == group for n in names], dtype=bool)
        if not mask.any():
            continue
        fig.add_trace(
            go.Histogram(
                x=v[mask],
                name=f"use {group} (n = {int(mask.sum())}, mean {v[mask].mean():.3g})"
                if group != "neither"
                else f"neither (n = {int(mask.sum())})",
                marker_color=COLOURS[group],
                opacity=0.6,
                nbinsx=nbins,
                histnorm="probability",
                hovertemplate="activation %{x}<br>share of prompts %{y:.2%}<extra></extra>",
            )
        )
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="SAE latent activation z")
    fig.update_yaxes(title_text="share of prompts", tickformat=".0%")
    where = f" at layer {layer}" if layer is not None else ""
    what = f"latent {latent}" if latent is not None else "latent"
    return _layout(fig, title or f"Activation of {what}{where} by behaviour", height=420)


def _label_names(labels: Int[Tensor, " n"] | Sequence[str]) -> list[str]:
    if isinstance(labels, Tensor):
        return [
            "context" if int(x) == 1 else "memory" if int(x) == 0 else "neither" for x in labels
        ]
    out = []
    for x in labels:
        if isinstance(x, str):
            out.append(x)
        else:
            out.append("context" if int(x) == 1 else "memory" if int(x) == 0 else "neither")
    return out


# --------------------------------------------------------------------------------------
# Steering results
# --------------------------------------------------------------------------------------


def _as_json(result: Any) -> Mapping[str, Any]:
    return result.to_json() if hasattr(result, "to_json") else result


def steering_results(result: Mapping[str, Any] | Any, *, title: str | None = None) -> go.Figure:
    """EM_C and EM_M (%, mean ± std over seeds) without steering and steered each way.

    Takes an ``EvaluationResult`` or its ``to_json()`` dictionary.
    """
    data = _as_json(result)
    conds = [c for c in CONDITION_NAMES if c in data]
    if not conds:
        raise ValueError(
            f"no conditions in the result (expected some of {list(CONDITION_NAMES)}); "
            f"keys: {sorted(data)}"
        )
    x = [CONDITION_NAMES[c] for c in conds]
    fig = go.Figure()
    for metric, group, what in (
        ("EM_C", "context", "answers C (from the context)"),
        ("EM_M", "memory", "answers M (from memory)"),
    ):
        fig.add_trace(
            go.Bar(
                x=x,
                y=[data[c][metric] for c in conds],
                error_y={
                    "type": "data",
                    "array": [data[c].get(f"{metric}_std", 0.0) for c in conds],
                    "visible": True,
                },
                name=f"{metric}: {what}",
                marker_color=COLOURS[group],
                hovertemplate=f"%{{x}}<br>{metric} %{{y:.1f}}% ± %{{error_y.array:.1f}}<extra></extra>",
            )
        )
    if all("neither" in data[c] for c in conds):
        fig.add_trace(
            go.Bar(
                x=x,
                y=[data[c]["neither"] for c in conds],
                name="neither",
                marker_color=COLOURS["neither"],
                hovertemplate="%{x}<br>neither %{y:.1f}%<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="condition")
    fig.update_yaxes(title_text="exact match (%)", rangemode="tozero")
    seeds = data.get("seeds")
    bits = [str(data[k]) for k in ("model", "dataset") if data.get(k)]
    if data.get("n_items") is not None:
        bits.append(f"{data['n_items']} items")
    if seeds:
        bits.append(f"{len(seeds)} seeds")
    default = "SpARE steering" + (f": {', '.join(bits)}" if bits else "")
    return _layout(fig, title or default, height=440)


def _direction(value: str) -> str:
    d = str(value).removeprefix("steer_to_")
    if d not in ("context", "memory"):
        raise ValueError(f"direction must be 'context' or 'memory', got {value!r}")
    return d


def _expand(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flat records {…, direction, EM_C, EM_M}; evaluation-style records are split per
    steering direction."""
    out = []
    for r in records:
        if "direction" in r:
            out.append({**r, "direction": _direction(r["direction"])})
            continue
        found = False
        for cond in ("steer_to_context", "steer_to_memory"):
            if cond in r:
                found = True
                scores = r[cond]
                keep = {k: v for k, v in r.items() if k not in CONDITION_NAMES}
                out.append({**keep, **scores, "direction": _direction(cond)})
        if not found:
            raise ValueError(
                "a steering record needs 'direction' (context/memory) with EM_C and EM_M, or "
                f"'steer_to_context' / 'steer_to_memory' scores; got keys {sorted(r)}"
            )
    return out


def _metric_lines(
    records: Sequence[Mapping[str, Any]],
    x_key: str,
    group_key: str | None,
    baseline: Mapping[str, Any] | None,
    title: str,
) -> go.Figure:
    flat = _expand(records)
    missing = [r for r in flat if x_key not in r]
    if missing:
        raise ValueError(f"records need {x_key!r}; one has keys {sorted(missing[0])}")
    directions = [d for d in ("context", "memory") if any(r["direction"] == d for r in flat)]
    fig = make_subplots(
        rows=1,
        cols=len(directions),
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=[f"steer to {d}" for d in directions],
    )
    groups = (
        sorted({r.get(group_key) for r in flat}, key=lambda v: (v is None, v))
        if group_key
        else [None]
    )
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
    x_name = AXIS_NAMES.get(x_key, x_key)
    for col, direction in enumerate(directions, start=1):
        target = "EM_C" if direction == "context" else "EM_M"
        for gi, g in enumerate(groups):
            sel = sorted(
                (
                    r
                    for r in flat
                    if r["direction"] == direction and (group_key is None or r.get(group_key) == g)
                ),
                key=lambda r: r[x_key],
            )
            if not sel:
                continue
            label = "" if g is None else f"{AXIS_NAMES.get(group_key, group_key)} = {g:g}, "
            for metric in ("EM_C", "EM_M"):
                is_target = metric == target
                std = [r.get(f"{metric}_std") for r in sel]
                colour = (
                    palette[gi % len(palette)]
                    if len(groups) > 1
                    else COLOURS["context" if metric == "EM_C" else "memory"]
                )
                dash = "solid" if metric == "EM_C" else "dot"
                fig.add_trace(
                    go.Scatter(
                        x=[r[x_key] for r in sel],
                        y=[r[metric] for r in sel],
                        mode="lines+markers",
                        name=f"{label}{metric}",
                        legendgroup=f"{g}-{metric}",
                        showlegend=col == 1 or len(directions) == 1,
                        line={"color": colour, "dash": dash, "width": 3 if is_target else 1.5},
                        opacity=1.0 if is_target else 0.6,
                        error_y={"type": "data", "array": [s or 0.0 for s in std], "visible": True}
                        if any(s is not None for s in std)
                        else None,
                        hovertemplate=(
                            f"steer to {direction}<br>{label}{x_name} %{{x}}<br>"
                            f"{metric} %{{y:.1f}}%<extra></extra>"
                        ),
                    ),
                    row=1,
                    col=col,
                )
        if baseline is not None and target in baseline:
            fig.add_hline(
                y=baseline[target],
                line_dash="dash",
                line_color="#555",
                annotation_text=f"{target} without steering",
                annotation_position="bottom right",
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=x_name, row=1, col=col)
    fig.update_yaxes(title_text="exact match (%)", row=1, col=1)
    return _layout(fig, title, height=440)


def _baseline(baseline: Mapping[str, Any] | Any | None) -> Mapping[str, Any] | None:
    if baseline is None:
        return None
    data = _as_json(baseline)
    return data.get("no_steering", data)


def steering_sweep(
    records: Sequence[Mapping[str, Any]],
    *,
    x: Literal["edit_strength", "proportion"] = "edit_strength",
    baseline: Mapping[str, Any] | Any | None = None,
    title: str | None = None,
) -> go.Figure:
    """EM_C / EM_M against edit strength α or proportion K, one panel per steering direction.

    ``records`` are ``{proportion, edit_strength, direction, EM_C, EM_M[, EM_C_std, EM_M_std]}``
    (or evaluation JSONs with ``proportion`` / ``edit_strength`` added). One line per value of
    the other hyper-parameter; EM_C is solid, EM_M dotted, the steered-to answer bold. ``baseline``
    (an evaluation result or its ``no_steering`` scores) draws the unsteered level.
    """
    if x not in ("edit_strength", "proportion"):
        raise ValueError(f"x must be 'edit_strength' or 'proportion', got {x!r}")
    if not records:
        raise ValueError("no sweep records to plot")
    other = "proportion" if x == "edit_strength" else "edit_strength"
    flat = _expand(records)
    group = other if len({r.get(other) for r in flat}) > 1 else None
    default = f"Steering sweep over {AXIS_NAMES[x]}"
    if group is None and flat[0].get(other) is not None:
        default += f" ({AXIS_NAMES[other]} = {flat[0][other]:g})"
    return _metric_lines(flat, x, group, _baseline(baseline), title or default)


def layer_steering_effect(
    records: Sequence[Mapping[str, Any]],
    *,
    baseline: Mapping[str, Any] | Any | None = None,
    title: str | None = None,
) -> go.Figure:
    """The effect of steering one layer at a time: EM_C / EM_M against the edited layer.

    ``records`` are ``{layer, direction, EM_C, EM_M, ...}`` or evaluation JSONs with ``layer``.
    """
    if not records:
        raise ValueError("no per-layer records to plot")
    return _metric_lines(
        records, "layer", None, _baseline(baseline), title or "Steering one layer at a time"
    )


# --------------------------------------------------------------------------------------
# Grouped prompts
# --------------------------------------------------------------------------------------


def behaviour_shares(grouped: Any) -> list[dict[str, Any]]:
    """Rows {demo_type, shots, n, context, memory, neither (%)} from grouped prompts.

    Accepts :class:`~spare_tl.behaviours.GroupedPrompts`, the paper's
    ``OriginalPromptRecord`` list, record dictionaries, or rows of ``GroupedPrompts.table()``.
    """
    if hasattr(grouped, "table"):
        return list(grouped.table())
    records = list(grouped)
    if records and isinstance(records[0], Mapping) and "n" in records[0]:
        return [dict(r) for r in records]
    counts: dict[tuple[str, int], Counter] = {}
    for r in records:
        get = r.get if isinstance(r, Mapping) else lambda k, _r=r: getattr(_r, k, None)
        demo = get("demo_type") or get("prompt_type")
        label = get("label") or get("behaviour")
        counts.setdefault((str(demo), int(get("shots"))), Counter())[str(label)] += 1
    rows = []
    for (demo, shots), c in sorted(counts.items()):
        n = sum(c.values())
        rows.append(
            {
                "demo_type": demo,
                "shots": shots,
                "n": n,
                **{k: 100.0 * c.get(k, 0) / n for k in ("context", "memory", "neither")},
            }
        )
    return rows


def behaviour_table(grouped: Any, *, title: str | None = None) -> go.Figure:
    """Share of use-context / use-memory / neither answers by demonstration type and shots."""
    rows = behaviour_shares(grouped)
    if not rows:
        raise ValueError("no grouped prompts to tabulate")
    order = {t: i for i, t in enumerate(DEMO_TYPE_ORDER)}
    rows = sorted(rows, key=lambda r: (order.get(r["demo_type"], 99), r["demo_type"], r["shots"]))
    x = [
        [DEMO_TYPE_NAMES.get(r["demo_type"], r["demo_type"]) for r in rows],
        [f"{r['shots']}-shot" for r in rows],
    ]
    fig = go.Figure()
    for group, name in (
        ("context", "uses context (answers C)"),
        ("memory", "uses memory (answers M)"),
        ("neither", "neither"),
    ):
        fig.add_trace(
            go.Bar(
                x=x,
                y=[r[group] for r in rows],
                name=name,
                marker_color=COLOURS[group],
                customdata=[r["n"] for r in rows],
                hovertemplate=(
                    f"%{{x}}<br>{name}: %{{y:.1f}}% of %{{customdata}} prompts<extra></extra>"
                ),
            )
        )
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="demonstration type and number of shots")
    fig.update_yaxes(title_text="share of prompts (%)", range=[0, 100])
    return _layout(fig, title or "Behaviour of the grouped prompts", height=440)


# --------------------------------------------------------------------------------------
# Knowledge-conflict probes
# --------------------------------------------------------------------------------------

PROBE_INPUT_NAMES = {"resid": "residual stream", "sae": "SAE latents"}
PROBE_COLOURS = {"resid": "#2ca02c", "sae": "#9467bd"}


def _probe_series(results: Mapping[str, Any] | Any) -> tuple[str, list[int], dict[str, Any]]:
    data = _as_json(results)
    layers = sorted(int(k) for k in data["layers"])
    series = {
        f"{metric}_{stat}": [float(data["layers"][str(k)][f"{metric}_{stat}"]) for k in layers]
        for metric in ("accuracy", "auroc")
        for stat in ("mean", "std")
    }
    return str(data.get("features", "resid")), layers, series


def probe_quality_by_layer(
    results_resid: Mapping[str, Any] | Any,
    results_sae: Mapping[str, Any] | Any | None = None,
    *,
    title: str | None = None,
) -> go.Figure:
    """Conflict-probe accuracy and AUROC on held-out questions per layer (mean ± std over
    split seeds), for probes on the residual stream and on SAE latents.

    Takes :class:`spare_tl.probes.ProbeResults` or their ``to_json()`` dictionaries.
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("accuracy (held-out questions)", "AUROC (held-out questions)"),
        horizontal_spacing=0.1,
    )
    all_layers: set[int] = set()
    for results in (results_resid, results_sae):
        if results is None:
            continue
        kind, layers, s = _probe_series(results)
        all_layers.update(layers)
        name = PROBE_INPUT_NAMES.get(kind, kind)
        for col, metric, label in ((1, "accuracy", "accuracy"), (2, "auroc", "AUROC")):
            fig.add_trace(
                go.Scatter(
                    x=layers,
                    y=s[f"{metric}_mean"],
                    error_y={"type": "data", "array": s[f"{metric}_std"], "visible": True},
                    mode="lines+markers",
                    name=f"probe on the {name}",
                    legendgroup=kind,
                    showlegend=col == 1,
                    marker_color=PROBE_COLOURS.get(kind, COLOURS["total"]),
                    hovertemplate=(
                        f"layer %{{x}}<br>{label} %{{y:.3f}} ± %{{error_y.array:.3f}}"
                        f"<extra>{name}</extra>"
                    ),
                ),
                row=1,
                col=col,
            )
    for col in (1, 2):
        fig.add_hline(y=0.5, line_dash="dot", line_color="#888", row=1, col=col)
        fig.update_xaxes(
            title_text="layer", dtick=1 if len(all_layers) < 30 else None, row=1, col=col
        )
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_yaxes(title_text="AUROC", row=1, col=2)
    return _layout(
        fig, title or "Knowledge-conflict probes: quality by layer (dotted: chance)", height=440
    )


__all__ += ["probe_quality_by_layer"]


# --------------------------------------------------------------------------------------
# Steering methods compared
# --------------------------------------------------------------------------------------


def _method_rows(rows_or_results: Any) -> list[Mapping[str, Any]]:
    """Rows of :func:`spare_tl.baselines.table_rows` from rows, ``table.json`` or results."""
    if isinstance(rows_or_results, Mapping):
        if isinstance(rows_or_results.get("rows"), list):  # table.json
            return list(rows_or_results["rows"])
        from spare_tl.baselines import table_rows

        return table_rows({k: _as_json(v) for k, v in rows_or_results.items()})
    return list(rows_or_results)


def method_comparison(
    rows_or_results: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    title: str | None = None,
) -> go.Figure:
    """EM_C steering to context and EM_M steering to memory per method (%, mean ± std over
    seeds): the comparison table of :mod:`spare_tl.baselines` as bars.

    Takes the rows of :func:`spare_tl.baselines.table_rows`, the ``table.json`` dictionary
    that :func:`spare_tl.baselines.run_table` writes, or its method → result mapping. For
    ``none`` both bars are the unsteered scores.
    """
    rows = _method_rows(rows_or_results)
    if not rows:
        raise ValueError("no methods to compare")
    methods = [str(r["method"]) for r in rows]
    cost = [
        [
            r.get("extra_forward_passes_per_token", 0.0),
            r.get("time_relative_to_no_steering", 1.0),
            "" if r.get("inference_time", True) else " (not an inference-time method)",
        ]
        for r in rows
    ]
    fig = go.Figure()
    for metric, direction in (("EM_C", "context"), ("EM_M", "memory")):
        fig.add_trace(
            go.Bar(
                x=methods,
                y=[float(r[metric]) for r in rows],
                error_y={
                    "type": "data",
                    "array": [float(r.get(f"{metric}_std") or 0.0) for r in rows],
                    "visible": True,
                },
                name=f"{metric}, steering to {direction}",
                marker_color=COLOURS[direction],
                customdata=cost,
                hovertemplate=(
                    f"%{{x}}%{{customdata[2]}}<br>{metric} steering to {direction}: "
                    "%{y:.1f}% ± %{error_y.array:.1f}<br>extra passes / token "
                    "%{customdata[0]}, time / item %{customdata[1]:.2f}× none<extra></extra>"
                ),
            )
        )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="method")
    fig.update_yaxes(title_text="exact match (%)", rangemode="tozero")
    return _layout(
        fig,
        title or "Steering methods compared: EM_C steering to context, EM_M steering to memory",
        height=440,
    )


__all__ += ["method_comparison"]


# --------------------------------------------------------------------------------------
# Steerability scan
# --------------------------------------------------------------------------------------

SITE_DASH = {"resid_post": "solid", "attn_out": "dash", "mlp_out": "dot"}
SITE_NAMES = {"resid_post": "residual", "attn_out": "attention out", "mlp_out": "MLP out"}


def steerability_scan(
    scan: Mapping[str, Any] | Any,
    statistics: Mapping[int, StatisticsLike] | None = None,
    *,
    highlight_layers: Sequence[int] = (),
    title: str | None = None,
) -> go.Figure:
    """Where the model can be steered beside where the behaviour is readable.

    Top panel: per layer, the EM reached by patching the last prompt position from the
    memory donor (EM_M, red) and from the context donor (EM_C, blue), one line per site
    (residual solid, attention output dashed, MLP output dotted), with no patch as dotted
    horizontal lines. Bottom panel (with ``statistics``): the layer's total mutual
    information of the SAE latents with the behaviour. ``scan`` is a
    :class:`spare_tl.scan.ScanResult` or its JSON.
    """
    data = scan.to_json() if hasattr(scan, "to_json") else dict(scan)
    rows = data["rows"]
    if not rows:
        raise ValueError("the scan has no rows to plot")
    n_panels = 2 if statistics else 1
    fig = make_subplots(
        rows=n_panels,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        row_heights=[0.65, 0.35] if statistics else [1.0],
        subplot_titles=(
            "steerable: EM after patching the last prompt position from a donor run",
            *(["readable: total mutual information of the SAE latents"] if statistics else []),
        ),
    )
    target = {
        "memory": ("EM_M", "memory donor → EM_M"),
        "context": ("EM_C", "context donor → EM_C"),
    }
    for direction, (key, label) in target.items():
        for site in SITE_DASH:
            sel = sorted(
                (r for r in rows if r["direction"] == direction and r["site"] == site),
                key=lambda r: r["layer"],
            )
            if not sel:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[r["layer"] for r in sel],
                    y=[r[key] for r in sel],
                    mode="lines+markers",
                    name=f"{label}, {SITE_NAMES[site]}",
                    line={"color": COLOURS[direction], "dash": SITE_DASH[site], "width": 2},
                    customdata=[[r["EM_C"], r["EM_M"], r["neither"]] for r in sel],
                    hovertemplate=(
                        f"{SITE_NAMES[site]} patch from the {direction} donor, layer %{{x}}<br>"
                        "EM_C %{customdata[0]:.1f} · EM_M %{customdata[1]:.1f} · "
                        "neither %{customdata[2]:.1f}<extra></extra>"
                    ),
                ),
                row=1,
                col=1,
            )
        fig.add_hline(
            y=data["baseline"][key],
            line={"color": COLOURS[direction], "dash": "dot", "width": 1},
            annotation_text=f"no patch {key} {data['baseline'][key]:.1f}",
            row=1,
            col=1,
        )
    for layer in highlight_layers:
        fig.add_vrect(
            x0=layer - 0.5, x1=layer + 0.5, fillcolor="#ffdd88", opacity=0.25, line_width=0
        )
    if statistics:
        summary = layerwise_summary(statistics)
        fig.add_trace(
            go.Bar(
                x=[r["layer"] for r in summary],
                y=[r["total_mutual_information"] for r in summary],
                name="total MI (SAE latents)",
                marker_color=COLOURS["total"],
                opacity=0.6,
            ),
            row=2,
            col=1,
        )
        fig.update_yaxes(title_text="total MI", row=2, col=1)
    fig.update_yaxes(title_text="% of development questions", range=[0, 100], row=1, col=1)
    fig.update_xaxes(title_text="layer", row=n_panels, col=1)
    n = data.get("n_items", "?")
    return _layout(
        fig,
        title or f"Steerability scan: {data.get('model_name', '')} ({n} development questions)",
        height=620 if statistics else 460,
    )
