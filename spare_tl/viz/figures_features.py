"""Figures of the feature statistics: where the behaviour signal lives, layer by layer.

- :func:`layerwise_mutual_information`: total MI and cumulative MI of the top latents per
  layer, and how many context / memory features proportion K selects (the layer-wise view);
- :func:`mutual_information_scatter`: MI against expectation E, one point per latent;
- :func:`latent_activation_distribution`: one latent's codes by behaviour group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from torch import Tensor

from spare_tl.features import LayerFeatures, select_functional_features
from spare_tl.viz.plotting import (
    COLOURS,
    StatisticsLike,
    clean_mutual_information,
    finish_layout,
    to_numpy,
)

__all__ = [
    "latent_activation_distribution",
    "layerwise_mutual_information",
    "layerwise_summary",
    "mutual_information_scatter",
]


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
        mi = clean_mutual_information(s.mutual_information)
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
    return finish_layout(fig, title or "Mutual information per layer", height=660)


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
    mi = clean_mutual_information(statistics.mutual_information)
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
            custom += [to_numpy(z_c)[ids.numpy()], to_numpy(z_m)[ids.numpy()]]
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
    return finish_layout(
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
    v = to_numpy(values)
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
    return finish_layout(fig, title or f"Activation of {what}{where} by behaviour", height=420)


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
