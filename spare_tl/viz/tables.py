"""Every table spare-tl shows, in one place: typed rows rendered to Markdown or to HTML.

A :class:`Table` is a header and rows of plain-text cells; :meth:`Table.markdown` writes the
pipe table that ``spare-tl docs``, ``spare-tl baselines table`` and ``spare-tl probes`` print,
:meth:`Table.html` the ``<table>`` of the report (cells escaped). The tables both show are
built once here from the studies' typed data (:func:`baselines_table`,
:func:`probe_quality_table`, :func:`conditional_table`); the cells share one ``mean ± std``
formatter (:func:`pm`) and one layer-range formatter (:func:`layer_range`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spare_tl.methods.hooks import DIRECTIONS

__all__ = [
    "BASELINES_HEADER",
    "Table",
    "baseline_rows",
    "baselines_markdown",
    "baselines_table",
    "conditional_table",
    "layer_range",
    "pm",
    "probe_quality_table",
    "settings_text",
]


@dataclass(frozen=True)
class Table:
    """A header and rows of cells (any value, shown with ``str``); the columns in ``left``
    are left-aligned, the others right-aligned."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    left: Collection[int] = ()

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(
                    f"table row {i} has {len(row)} cells for {len(self.header)} columns"
                )

    def markdown(self) -> str:
        """A Markdown pipe table: ``| a | b |`` rows under an alignment line."""
        align = "".join("---|" if i in self.left else "---:|" for i in range(len(self.header)))
        lines = [_md_row(self.header), f"|{align}"]
        return "\n".join(lines + [_md_row(r) for r in self.rows])

    def html(self) -> str:
        """An HTML ``<table>``: one ``<th>`` row, then ``<td>`` rows; cells are escaped."""

        def row(cells: Sequence[Any], tag: str) -> str:
            out = ""
            for i, c in enumerate(cells):
                align = " class='left'" if i in self.left else ""
                out += f"<{tag}{align}>{html.escape(str(c), quote=False)}</{tag}>"
            return f"<tr>{out}</tr>"

        rows = "".join(row(r, "td") for r in self.rows)
        return "<table>" + row(self.header, "th") + rows + "</table>"


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def pm(mean: Any, std: Any = None, digits: int = 1) -> str:
    """``mean ± std`` (``mean`` alone without a std); ``–`` for no mean, ``—`` for NaN (a probe
    that did not run)."""
    if mean is None:
        return "–"
    if isinstance(mean, float) and math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def layer_range(layers: Any) -> str:
    """``12-15`` for consecutive layers, ``12`` for one; any other value as ``str`` shows it."""
    if isinstance(layers, list) and layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return str(layers)


def settings_text(hyperparameters: Mapping[str, Any]) -> str:
    """``layers 12-15, proportion 0.2; alpha -0.25``: the settings to context; to memory."""
    parts = []
    for direction in DIRECTIONS:
        hp = hyperparameters.get(direction)
        if hp:
            parts.append(
                ", ".join(f"{k} {layer_range(v) if k == 'layers' else v}" for k, v in hp.items())
            )
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# SpARE against the baselines
# --------------------------------------------------------------------------------------

BASELINES_HEADER = (
    "method",
    "EM_C, to context",
    "EM_M, to memory",
    "neither, to memory",
    "EM_C→M",
    "EM_M→C",
    "extra passes / token",
    "time / item (× none)",
    "settings (to context; to memory)",
)


def baseline_rows(
    baselines: Mapping[str, Any],
) -> tuple[list[Mapping[str, Any]], dict[str, Any]]:
    """The rows of :func:`spare_tl.studies.baselines.table_rows` and the protocol (model,
    dataset, n_items, demo_type, seeds) from ``table.json`` or a method → result mapping.
    Any other key of ``table.json`` (older files kept a ``markdown`` copy) is ignored."""
    if isinstance(baselines.get("rows"), list):  # table.json
        protocol = dict(baselines.get("protocol") or {})
        if baselines.get("model") is not None:
            protocol["model"] = baselines["model"]
        return list(baselines["rows"]), protocol
    from spare_tl.studies.baselines import table_rows  # loads the harness: only for raw results

    first = next(iter(baselines.values()))
    keys = ("model", "dataset", "n_items", "demo_type", "seeds")
    return table_rows(baselines), {k: first[k] for k in keys if k in first}


def _transition(t: Mapping[str, Any] | None) -> str:
    return pm(t["mean"], t["std"]) if t else "–"


def baselines_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """One row per method: EM_C steering to context, EM_M steering to memory, transitions,
    cost and the dev-chosen settings (``*``: not an inference-time method)."""
    if not rows:
        raise ValueError("no methods in the baselines")
    body = [
        [
            f"{r['method']}{'' if r['inference_time'] else ' *'}",
            pm(r["EM_C"], r["EM_C_std"]),
            pm(r["EM_M"], r["EM_M_std"])
            + (" (= closed book)" if r.get("memory_is_closed_book") else ""),
            "–" if r.get("neither_to_memory") is None else f"{r['neither_to_memory']:.1f}",
            _transition(r.get("EM_C->M")),
            _transition(r.get("EM_M->C")),
            f"{r['extra_forward_passes_per_token']:g}",
            f"{r['time_relative_to_no_steering']:.2f}",
            settings_text(r["hyperparameters"]) or "–",
        ]
        for r in rows
    ]
    return Table(BASELINES_HEADER, body, left={0, 8})


def baselines_markdown(baselines: Mapping[str, Any]) -> str:
    """The baselines table (``table.json`` or method → result) in Markdown, with its caption."""
    rows, p = baseline_rows(baselines)
    caption = (
        f"{p.get('model')}, {p.get('dataset')} dataset: {p.get('n_items')} held-out memorised "
        f"questions, {p.get('demo_type')} demonstrations, seeds {p.get('seeds')}, mean ± std "
        "over seeds (%). `none`: EM_C and EM_M without steering. Settings chosen on the "
        "development questions only (split per relation, disjoint from the test; `cache_data/<model>/baselines/sweep-*.json`). "
        "\\* ICL changes the demonstrations (dss / dso) and is not an inference-time method; "
        "`closed_book` removes the test item's context (its demonstrations kept): not a "
        "steering method but the reference for what memory alone answers in this format, and "
        "what CAD decodes at α = −1 ((1 + α)·log p(y | c, x) − α·log p(y | x) = log p(y | x)); "
        "a method whose memory setting is that answer is marked (= closed book). "
        "Time: wall time per item relative to no steering in the same run, as if the "
        "condition ran alone: the prompt pass of its prompts plus its last-token passes and "
        "its share (by generated tokens) of the decoding. Every method answers in one run per "
        "seed; conditions of the same prompts share one prompt pass (no steering, SpARE, "
        "ActAdd and task vectors decode as one batch), and conditions that are one "
        "computation (the closed-book row's two directions, CAD at α = −1) are answered once "
        "and each timed as that computation. Task vectors and ActAdd's mean difference "
        "(cached per layer) are computed beforehand; CAD at α ≠ 0, −1 runs a second (context-"
        "free) prompt pass per item and decodes both versions as one batch."
    )
    return f"{baselines_table(rows).markdown()}\n\n{caption}"


# --------------------------------------------------------------------------------------
# The conflict-probe study
# --------------------------------------------------------------------------------------

PROBE_QUALITY_HEADER = ("layer", "residual accuracy", "residual AUROC", "SAE accuracy", "SAE AUROC")


def probe_quality_table(resid: Any, sae: Any = None) -> Table:
    """Probe accuracy and AUROC per layer, residual stream and SAE latents
    (:class:`~spare_tl.studies.probes.ProbeResults`), the best layers marked."""
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
                pm(r.accuracy_mean, r.accuracy_std, 3) if r else "—",
                pm(r.auroc_mean, r.auroc_std, 3) if r else "—",
                pm(s.accuracy_mean, s.accuracy_std, 3) if s else "—",
                pm(s.auroc_mean, s.auroc_std, 3) if s else "—",
            ]
        )
    return Table(PROBE_QUALITY_HEADER, body)


CONDITIONAL_HEADER = (
    "rows",
    "condition",
    "EM_M (memory answer)",
    "EM_C (context answer)",
    "neither",
)


def conditional_table(data: Mapping[str, Any]) -> Table:
    """Conditional steering (``ConditionalResult.to_json()``): never, always and probe-gated
    steering on conflict and no-conflict rows."""
    from spare_tl.studies.probes import CONDITIONS, GATE_CONDITION_NAMES

    body = [
        [
            name,
            GATE_CONDITION_NAMES[cond],
            pm(data[rows][cond]["EM_M"], data[rows][cond]["EM_M_std"]),
            pm(data[rows][cond]["EM_C"], data[rows][cond]["EM_C_std"]),
            f"{data[rows][cond]['neither']:.1f}",
        ]
        for rows, name in (("conflict", "conflict"), ("no_conflict", "no conflict"))
        for cond in CONDITIONS
    ]
    return Table(CONDITIONAL_HEADER, body, left={0, 1})
