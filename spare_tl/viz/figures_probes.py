"""Knowledge-conflict probes: how well a linear probe tells a conflict, layer by layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spare_tl.viz.plotting import COLOURS, as_json, finish_layout

__all__ = ["probe_quality_by_layer"]

PROBE_INPUT_NAMES = {"resid": "residual stream", "sae": "SAE latents"}
PROBE_COLOURS = {"resid": "#2ca02c", "sae": "#9467bd"}


def _probe_series(results: Mapping[str, Any] | Any) -> tuple[str, list[int], dict[str, Any]]:
    data = as_json(results)
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

    Takes :class:`spare_tl.studies.probes.ProbeResults` or their ``to_json()`` dictionaries.
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
    return finish_layout(
        fig, title or "Knowledge-conflict probes: quality by layer (dotted: chance)", height=440
    )
