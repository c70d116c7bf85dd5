"""Figures of the steering results: conditions, sweeps over α and K, layers, methods.

- :func:`steering_results`: EM_C / EM_M by condition (mean ± std over seeds);
- :func:`steering_sweep` and :func:`layer_steering_effect`: sweeps over α, K and layers;
- :func:`method_comparison`: SpARE against the baselines (EM_C / EM_M steered each way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spare_tl.viz.plotting import AXIS_NAMES, COLOURS, CONDITION_NAMES, as_json, finish_layout

__all__ = [
    "layer_steering_effect",
    "method_comparison",
    "steering_results",
    "steering_sweep",
]


def steering_results(result: Mapping[str, Any] | Any, *, title: str | None = None) -> go.Figure:
    """EM_C and EM_M (%, mean ± std over seeds) without steering and steered each way.

    Takes an ``EvaluationResult`` or its ``to_json()`` dictionary.
    """
    data = as_json(result)
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
    return finish_layout(fig, title or default, height=440)


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
    return finish_layout(fig, title, height=440)


def _baseline(baseline: Mapping[str, Any] | Any | None) -> Mapping[str, Any] | None:
    if baseline is None:
        return None
    data = as_json(baseline)
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
# Steering methods compared
# --------------------------------------------------------------------------------------


def _method_rows(rows_or_results: Any) -> list[Mapping[str, Any]]:
    """Rows of :func:`spare_tl.studies.baselines.table_rows` from rows, ``table.json`` or results."""
    if isinstance(rows_or_results, Mapping):
        if isinstance(rows_or_results.get("rows"), list):  # table.json
            return list(rows_or_results["rows"])
        from spare_tl.studies.baselines import table_rows

        return table_rows({k: as_json(v) for k, v in rows_or_results.items()})
    return list(rows_or_results)


def method_comparison(
    rows_or_results: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    title: str | None = None,
) -> go.Figure:
    """EM_C steering to context and EM_M steering to memory per method (%, mean ± std over
    seeds): the comparison table of :mod:`spare_tl.studies.baselines` as bars.

    Takes the rows of :func:`spare_tl.studies.baselines.table_rows`, the ``table.json`` dictionary
    that :func:`spare_tl.studies.baselines.run_table` writes, or its method → result mapping. For
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
    return finish_layout(
        fig,
        title or "Steering methods compared: EM_C steering to context, EM_M steering to memory",
        height=440,
    )
