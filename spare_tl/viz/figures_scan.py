"""The steerability scan: where a last-position patch steers the model, beside the
layer-wise mutual information."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spare_tl.viz.figures_features import layerwise_summary
from spare_tl.viz.plotting import COLOURS, StatisticsLike, finish_layout

__all__ = ["steerability_scan"]

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
    :class:`spare_tl.stages.scan.ScanResult` or its JSON.
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
    return finish_layout(
        fig,
        title or f"Steerability scan: {data.get('model_name', '')} ({n} development questions)",
        height=620 if statistics else 460,
    )
