"""What every figure of :mod:`spare_tl.viz` shares: colours, names, the layout, conversions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

__all__ = [
    "AXIS_NAMES",
    "COLOURS",
    "CONDITION_NAMES",
    "TEMPLATE",
    "StatisticsLike",
    "as_json",
    "clean_mutual_information",
    "finish_layout",
    "to_numpy",
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


def to_numpy(x: Any) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array-like."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def clean_mutual_information(mi: Tensor) -> Tensor:
    """Mutual information as float64 on the CPU, NaN and negative estimates set to 0."""
    return mi.detach().cpu().double().nan_to_num(0.0).clamp_min(0.0)


def finish_layout(fig: go.Figure, title: str, **kwargs: Any) -> go.Figure:
    """The house look: title top left, white template, legend below the plot."""
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


def as_json(result: Any) -> Mapping[str, Any]:
    """``result.to_json()`` for a result object, the mapping itself for its JSON."""
    return result.to_json() if hasattr(result, "to_json") else result
