"""A feature card: what one functional feature is, where it fires and what it does.

:func:`feature_card` gathers, for one SAE latent, the header (layer, site, latent, role, MI
and its rank, E, z̄_C, z̄_M), its last-position activations on the grouped prompts per
behaviour group, its activation histogram and density on general text, its top-activating
contexts with the firing tokens highlighted (grouped prompts and text), the tokens its
decoder direction promotes and suppresses (logit lens), its causal effect on the answers
(:mod:`spare_tl.stages.feature_effects`) and, for SAEs with a Neuronpedia id in their
metadata, a link to its Neuronpedia page. A :class:`FeatureCard` renders as a plotly figure,
as HTML (collapsible) and as terminal text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spare_tl.viz.inspector import latent_statistics, logit_lens

__all__ = ["FeatureCard", "feature_card", "neuronpedia_link"]

GROUP_COLOURS = {"context": "#1f77b4", "memory": "#d62728"}
NEURONPEDIA = "https://www.neuronpedia.org"


def neuronpedia_link(sae: Any, latent: int) -> str | None:
    """The latent's Neuronpedia page, built from the SAE's release metadata
    (``neuronpedia_id``, e.g. ``gpt2-small/8-res-jb``); None for SAEs without one."""
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    np_id = getattr(meta, "neuronpedia_id", None) if meta is not None else None
    if not np_id:
        return None
    return f"{NEURONPEDIA}/{np_id}/{int(latent)}"


@dataclass
class FeatureCard:
    """Everything the card shows about one latent (rows and numbers, no HTML)."""

    layer: int
    hook_name: str
    latent: int
    role: str | None = None  # "context feature" / "memory feature" / None
    statistics: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, Any] | None = None  # FeatureExamples.of(hook, latent)
    promoted: list[dict[str, Any]] = field(default_factory=list)
    suppressed: list[dict[str, Any]] = field(default_factory=list)
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)  # direction -> row
    link: str | None = None

    @property
    def site(self) -> str:
        return self.hook_name.split(".")[-1].removeprefix("hook_")

    @property
    def title(self) -> str:
        role = f", {self.role}" if self.role else ""
        return f"Layer {self.layer} {self.site}, latent {self.latent}{role}"

    def best_gain(self) -> float:
        """The largest single-feature gain over the directions (for ordering cards)."""
        return max((row["gain"] for row in self.effects.values()), default=float("-inf"))

    # ---------------------------------------------------------------- figure

    def figure(self) -> go.Figure:
        """Three panels: last-position activation per behaviour group, activation histogram
        on text, logit-lens tokens."""
        fig = make_subplots(
            rows=1,
            cols=3,
            column_widths=[0.36, 0.30, 0.34],
            subplot_titles=(
                "last prompt token, by behaviour",
                "activations on text (log10)",
                "decoder direction → tokens",
            ),
        )
        ex = self.examples or {}
        for group, colour in GROUP_COLOURS.items():
            values = (ex.get("last_position") or {}).get(group, [])
            if values:
                fig.add_trace(
                    go.Histogram(
                        x=values,
                        name=f"uses {group} (n={len(values)})",
                        marker_color=colour,
                        opacity=0.6,
                        nbinsx=20,
                    ),
                    row=1,
                    col=1,
                )
        if ex.get("histogram"):
            edges = ex["edges"]
            centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            fig.add_trace(
                go.Bar(x=centres, y=ex["histogram"], marker_color="#7f7f7f", name="text tokens"),
                row=1,
                col=2,
            )
        tokens = self.promoted[:8][::-1] + self.suppressed[:8]
        if tokens:
            fig.add_trace(
                go.Bar(
                    x=[t["logit"] for t in tokens],
                    y=[f"{t['token']!r} " for t in tokens],
                    orientation="h",
                    marker_color=["#2ca02c" if t["logit"] > 0 else "#9467bd" for t in tokens],
                    name="logit lens",
                ),
                row=1,
                col=3,
            )
        fig.update_layout(
            barmode="overlay",
            height=300,
            margin=dict(l=40, r=10, t=40, b=30),
            legend=dict(orientation="h", y=-0.15),
        )
        return fig

    # ---------------------------------------------------------------- HTML

    def _header_html(self) -> str:
        e = html.escape
        cells = "".join(
            f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
            for k, v in self.statistics.items()
        )
        ex = self.examples or {}
        for source, value in (ex.get("density") or {}).items():
            cells += f"<tr><th>density ({e(source)})</th><td>{100 * value:.3g} %</td></tr>"
        if self.link:
            cells += (
                f'<tr><th>Neuronpedia</th><td><a href="{e(self.link)}">{e(self.link)}</a></td></tr>'
            )
        return f'<table class="stats">{cells}</table>'

    def _effects_html(self) -> str:
        if not self.effects:
            return "<p class='missing'>No causal effect measured.</p>"
        rows = ""
        for d, r in self.effects.items():
            rows += (
                f"<tr><td>to {d}</td><td>{r['edit']}</td>"
                + "".join(f"<td>{r['only'][k]:.1f}</td>" for k in ("EM_C", "EM_M", "neither"))
                + f"<td>{r['gain']:+.1f}</td><td>{r['loss_without']:+.1f}</td></tr>"
            )
        return (
            "<table class='effects'><tr><th>steering</th><th>this feature</th><th>EM_C alone</th>"
            "<th>EM_M alone</th><th>neither alone</th><th>gain alone</th>"
            f"<th>full set loses without it</th></tr>{rows}</table>"
        )

    def examples_html(self, n: int = 5) -> str:
        """Top contexts per source with each token's background by its activation."""
        ex = self.examples or {}
        parts = []
        for source, label in (("grouped", "grouped prompts"), ("text", "SAE training text")):
            rows = (ex.get("examples") or {}).get(source, [])[:n]
            if not rows:
                parts.append(f"<p class='missing'>No activation on {label}.</p>")
                continue
            lines = "".join(f"<div class='ctx'>{_highlight(r)}</div>" for r in rows)
            parts.append(f"<h6>Top contexts: {label}</h6>{lines}")
        return "".join(parts)

    def to_html(self, *, open_: bool = False, div_id: str | None = None) -> str:
        """The card as a ``<details>`` block (plotly's JavaScript not included)."""
        fig = self.figure().to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        )
        gain = (
            " · " + ", ".join(f"to {d}: {r['gain']:+.1f} pts" for d, r in self.effects.items())
            if self.effects
            else ""
        )
        tokens = ", ".join(repr(t["token"]) for t in self.promoted[:5])
        return (
            f"<details class='feature-card'{' open' if open_ else ''}><summary>"
            f"<b>{html.escape(self.title)}</b>{html.escape(gain)} · promotes "
            f"{html.escape(tokens)}</summary>{self._header_html()}{self._effects_html()}"
            f"<div class='figure'>{fig}</div>{self.examples_html()}</details>"
        )

    # ---------------------------------------------------------------- terminal

    def to_text(self, n: int = 3, width: int = 100) -> str:
        """The card as plain text; firing tokens are marked ``[[token]]`` (the top one) and
        ``[token]`` (others above a third of the top)."""
        lines = [self.title, "=" * len(self.title)]
        for k, v in self.statistics.items():
            lines.append(f"  {k:<26} {_fmt(v)}")
        ex = self.examples or {}
        for source, value in (ex.get("density") or {}).items():
            lines.append(f"  {'density (' + source + ')':<26} {100 * value:.3g} %")
        for group in ("context", "memory"):
            values = (ex.get("last_position") or {}).get(group, [])
            if values:
                fired = sum(v > 0 for v in values)
                mean = sum(values) / len(values)
                lines.append(
                    f"  last token, uses {group:<8} fires on {fired}/{len(values)}, mean {mean:.3g}"
                )
        if self.link:
            lines.append(f"  Neuronpedia: {self.link}")
        if self.promoted:
            lines.append("  promotes:   " + ", ".join(repr(t["token"]) for t in self.promoted[:8]))
        if self.suppressed:
            lines.append(
                "  suppresses: " + ", ".join(repr(t["token"]) for t in self.suppressed[:8])
            )
        for d, r in self.effects.items():
            lines.append(
                f"  steering to {d} ({r['edit']}): alone EM_C {r['only']['EM_C']:.1f} EM_M "
                f"{r['only']['EM_M']:.1f} neither {r['only']['neither']:.1f} (gain "
                f"{r['gain']:+.1f}); full set without it loses {r['loss_without']:+.1f}"
            )
        for source in ("grouped", "text"):
            rows = (ex.get("examples") or {}).get(source, [])[:n]
            if rows:
                lines.append(f"  top contexts ({source}):")
            for r in rows:
                text = _marked(r).replace("\n", "⏎")
                lines.append(f"    {r['activation']:7.3g}  …{text[-width:]}")
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _highlight(row: Mapping[str, Any]) -> str:
    top = max(row["activations"], default=0.0) or 1.0
    spans = []
    for token, act in zip(row["tokens"], row["activations"]):
        alpha = max(0.0, min(1.0, act / top))
        text = html.escape(token).replace("\n", "⏎")
        style = f"background: rgba(255, 127, 14, {alpha:.2f})" if act > 0 else ""
        spans.append(f"<span style='{style}' title='{act:.3g}'>{text}</span>")
    return f"<code>{''.join(spans)}</code> <small>max {row['activation']:.3g}</small>"


def _marked(row: Mapping[str, Any]) -> str:
    top = max(row["activations"], default=0.0)
    out = []
    for token, act in zip(row["tokens"], row["activations"]):
        if top > 0 and act == top:
            out.append(f"[[{token}]]")
        elif top > 0 and act > top / 3:
            out.append(f"[{token}]")
        else:
            out.append(token)
    return "".join(out)


def feature_card(
    layer: int,
    latent: int,
    *,
    hook_name: str | None = None,
    statistics: Any | None = None,
    features: Any | None = None,
    examples: Mapping[str, Any] | None = None,
    effects: Mapping[str, Mapping[str, Any]] | None = None,
    model: Any | None = None,
    sae: Any | None = None,
    k: int = 10,
) -> FeatureCard:
    """One latent's card from whatever is given: ``statistics`` (a LayerStatistics) and
    ``features`` (its layer's LayerFeatures, for the role), ``examples`` (from
    :meth:`spare_tl.stages.feature_examples.FeatureExamples.of`), ``effects`` (direction → row
    of :meth:`spare_tl.stages.feature_effects.FeatureEffects.of`), ``model`` + ``sae`` (logit
    lens and Neuronpedia link)."""
    hook = hook_name or getattr(features, "hook_name", None) or f"blocks.{layer}.hook_resid_post"
    card = FeatureCard(layer=int(layer), hook_name=hook, latent=int(latent))
    if statistics is not None:
        stats = latent_statistics(statistics, latent, features=features)
        card.role = stats.pop("role", None)
        stats.pop("latent", None)
        card.statistics = stats
    if card.role == "not selected":
        card.role = None
    card.examples = dict(examples) if examples is not None else None
    card.effects = {d: dict(r) for d, r in (effects or {}).items()}
    if model is not None and sae is not None:
        lens = logit_lens(model, sae, latent, k=k)
        card.promoted, card.suppressed = lens["promoted"], lens["suppressed"]
    elif examples is not None:  # the stage keeps the logit lens of the latents it saved
        card.promoted = list(examples.get("promoted", []))
        card.suppressed = list(examples.get("suppressed", []))
    if sae is not None:
        card.link = neuronpedia_link(sae, latent)
    return card


def functional_feature_cards(
    features: Any,
    *,
    statistics: Mapping[int, Any] | None = None,
    examples: Any | None = None,
    effects: Any | None = None,
    model: Any | None = None,
    saes: Mapping[str, Any] | None = None,
) -> list[FeatureCard]:
    """A card for every functional feature of ``features`` (both directions), the ones with
    the largest causal effect first (by layer and latent without ``effects``).

    ``statistics``: layer → LayerStatistics; ``examples``: a FeatureExamples; ``effects``: a
    FeatureEffects; ``saes``: by hook name (logit lens and links, with ``model``)."""
    sets = [features] + ([features.to_memory] if features.to_memory is not None else [])
    cards: dict[tuple[int, int], FeatureCard] = {}
    for fset in sets:
        for layer, f in sorted(fset.layers.items()):
            for latent in sorted(torch_list(f.context_features) + torch_list(f.memory_features)):
                if (layer, latent) in cards:
                    continue
                ex = None
                if examples is not None and f.hook_name in examples.by_hook:
                    if latent in examples.by_hook[f.hook_name].latents:
                        ex = examples.of(f.hook_name, latent)
                sae = (saes or {}).get(f.hook_name)
                cards[(layer, latent)] = feature_card(
                    layer,
                    latent,
                    hook_name=f.hook_name,
                    statistics=(statistics or {}).get(layer),
                    features=f,
                    examples=ex,
                    effects=effects.of(layer, latent) if effects is not None else None,
                    model=model if sae is not None else None,
                    sae=sae,
                )
    return sorted(cards.values(), key=lambda c: (-c.best_gain(), c.layer, c.latent))


def torch_list(ids: Any) -> list[int]:
    return [int(i) for i in ids.tolist()]


def effects_overview_html(effects: Any, cards: Sequence[FeatureCard], top: int = 10) -> str:
    """Per direction: the features by causal effect (what drives context, what drives
    memory), per layer and as a ranked table with each feature's top tokens."""
    tokens = {
        (c.layer, c.latent): ", ".join(repr(t["token"]) for t in c.promoted[:4]) for c in cards
    }
    e = html.escape
    parts = []
    for d, block in effects.directions.items():
        t = block["target"]
        base, full = block["no_steering"][t], block["full"][t]
        share = block.get("top_share_of_full_gain")
        share_text = f"{100 * share:.0f} %" if share is not None else "n/a"
        per_layer: dict[int, list[str]] = {}
        for r in block["features"]:
            if r["gain"] > 0:
                per_layer.setdefault(r["layer"], []).append(f"{r['latent']} ({r['gain']:+.1f})")
        layers = "".join(
            f"<li>layer {layer}: {e(', '.join(v))}</li>" for layer, v in sorted(per_layer.items())
        )
        rows = "".join(
            f"<tr><td>{i}</td><td>{r['layer']}:{r['latent']}</td><td>{r['role']}</td>"
            f"<td>{r['edit']}</td><td>{r['only'][t]:.1f}</td><td>{r['gain']:+.1f}</td>"
            f"<td>{r['neither_added']:+.1f}</td><td>{-r['loss_without']:+.1f}</td>"
            f"<td>{e(tokens.get((r['layer'], r['latent']), ''))}</td></tr>"
            for i, r in enumerate(block["features"][:top], start=1)
        )
        parts.append(
            f"<h4>What drives {d}: steering to {d} (α = {block['edit_strength']:g})</h4>"
            f"<p>{t} without steering {base:.1f}, full set {full:.1f}; the top 3 features "
            f"together ({e(', '.join(block['top']))}) {block['top_shares'][t]:.1f}, "
            f"{share_text} of the full set's gain. {effects.n_items} development questions, "
            f"seeds {effects.seeds}.</p><ul class='drivers'>{layers or '<li>no single feature raises it</li>'}</ul>"
            f"<table class='effects'><tr><th>#</th><th>layer:latent</th><th>role</th>"
            f"<th>edit</th><th>{t} alone</th><th>gain</th><th>neither</th>"
            f"<th>full set without it</th><th>promotes</th></tr>{rows}</table>"
        )
    return "".join(parts)
