"""The behaviour of the grouped prompts: who answers from the context, who from memory."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

from spare_tl.viz.plotting import COLOURS, finish_layout

__all__ = ["behaviour_shares", "behaviour_table"]

DEMO_TYPE_ORDER = ("dss", "dso", "doo")
DEMO_TYPE_NAMES = {
    "dss": "dss (follow context)",
    "dso": "dso (follow memory)",
    "doo": "doo (no conflict)",
}


def behaviour_shares(grouped: Any) -> list[dict[str, Any]]:
    """Rows {demo_type, shots, n, context, memory, neither (%)} from grouped prompts.

    Accepts :class:`~spare_tl.stages.behaviours.GroupedPrompts`, the paper's
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
    return finish_layout(fig, title or "Behaviour of the grouped prompts", height=440)
