"""One self-contained HTML page with SpARE's figures and results (``spare-tl report``).

:func:`build_report` takes the library's objects (functional features, per-layer statistics,
evaluation results, sweeps, grouped prompts, the baselines' comparison table, the conflict-probe
study, the paper's cache) and returns the page as a string: plotly's JavaScript is inlined
once, so the file opens offline. Parts that are not given are listed as missing instead of
failing. :func:`spare_tl.viz.report_inputs.load_report_inputs` reads them from disk.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from spare_tl.errors import first_line
from spare_tl.studies.original import PAPER_SETTINGS
from spare_tl.studies.saved import SavedProbeStudy
from spare_tl.viz.feature_card import effects_overview_html, functional_feature_cards
from spare_tl.viz.figures_behaviour import behaviour_table
from spare_tl.viz.figures_features import layerwise_mutual_information, mutual_information_scatter
from spare_tl.viz.figures_probes import probe_quality_by_layer
from spare_tl.viz.figures_scan import steerability_scan
from spare_tl.viz.figures_steering import (
    layer_steering_effect,
    method_comparison,
    steering_results,
    steering_sweep,
)
from spare_tl.viz.inspector import layer_drivers
from spare_tl.viz.plotting import CONDITION_NAMES, clean_mutual_information
from spare_tl.viz.report_tables import (
    baselines_html,
    conditional_html,
    counts_html,
    evaluation_html,
    latents_html,
    probe_quality_html,
)

logger = logging.getLogger(__name__)

__all__ = ["build_report", "classify_result"]

DEFAULT_PROPORTION = 0.05

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1150px;
margin:0 auto;padding:1rem 1.5rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#666;font-size:.9rem}
.missing{background:#fff8e1;border:1px solid #ffe082;padding:.6rem 1rem;border-radius:6px}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right;vertical-align:top}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
th.left,td.left{text-align:left}
.drivers{display:inline-block;vertical-align:top;margin-right:1.5rem}
.drivers.context h5{color:#1f77b4}.drivers.memory h5{color:#d62728}
pre.prompt{white-space:pre-wrap;text-align:left;margin:0;font-size:.8rem;max-width:600px}
.figure{margin:1rem 0}
details.feature-card{border:1px solid #ddd;border-radius:6px;padding:.3rem .8rem;margin:.4rem 0}
details.feature-card summary{cursor:pointer}
.ctx code{white-space:pre-wrap;font-size:.8rem}.ctx{margin:.15rem 0}
"""


def classify_result(data: Any) -> str:
    """'evaluation', 'sweep', 'layers' or 'unknown' for one results JSON."""
    if isinstance(data, Mapping):
        if any(c in data for c in CONDITION_NAMES):
            return "layers" if "layer" in data and "records" not in data else "evaluation"
        for key in ("records", "sweep", "layers"):
            if isinstance(data.get(key), list):
                return classify_result(data[key])
        return "unknown"
    if isinstance(data, list) and data and all(isinstance(r, Mapping) for r in data):
        if all("layer" in r for r in data):
            return "layers"
        if all("edit_strength" in r or "proportion" in r for r in data):
            return "sweep"
    return "unknown"


def _records(data: Any) -> list[Mapping[str, Any]]:
    if isinstance(data, Mapping):
        for key in ("records", "sweep", "layers"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    return list(data)


class _Page:
    """The page's HTML parts in order, and how many figures they hold."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n_figures = 0
        self.n_cards = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig: go.Figure) -> None:
        self.n_figures += 1
        self.parts.append(
            '<div class="figure">'
            + fig.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=f"figure-{self.n_figures}",
                config={"displaylogo": False, "responsive": True},
            )
            + "</div>"
        )

    def attempt(self, what: str, make: Callable[[], go.Figure], missing: list[str]) -> None:
        """Add ``make()``'s figure; a failure becomes a note, not a broken page."""
        try:
            fig = make()
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            logger.warning("report: %s skipped: %s", what, e)
            missing.append(f"{what}: could not be drawn ({first_line(e)})")
            self.add(f"<p class='missing'>{html.escape(what)}: could not be drawn.</p>")
            return
        self.figure(fig)


def _note_absent(notes: list[str], keyword: str, text: str) -> None:
    if not any(keyword in n for n in notes):
        notes.append(text)


def _layer_features(features: Any, layer: int) -> Any:
    """A layer's functional features: the main (to context) set's, else the memory set's."""
    if features is None:
        return None
    found = features.layers.get(layer)
    if found is None and features.to_memory is not None:
        found = features.to_memory.layers.get(layer)
    return found


def _focus_layer(statistics: Mapping[int, Any], preferred: Sequence[int]) -> int:
    for layer in preferred:
        if layer in statistics:
            return layer
    return max(
        statistics,
        key=lambda k: float(clean_mutual_information(statistics[k].mutual_information).sum()),
    )


def build_report(
    *,
    features: Any | None = None,
    statistics: Mapping[int, Any] | None = None,
    results: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
    grouped: Any | None = None,
    baselines: Mapping[str, Any] | None = None,
    probes: SavedProbeStudy | Any | None = None,
    original: Any | None = None,
    original_layer: int | None = None,
    scan: Any | None = None,
    examples: Any | None = None,
    effects: Any | None = None,
    missing: Sequence[str] = (),
    title: str = "SpARE report",
    top_n: int = 2000,
) -> str:
    """The report as one self-contained HTML page (plotly's JavaScript inlined once).

    ``features``: a FunctionalFeatures set; ``statistics``: layer → LayerStatistics;
    ``results``: (name, JSON) pairs or a name → JSON mapping of evaluation results, sweeps
    ({proportion, edit_strength, direction, EM_C, EM_M} lists) or per-layer records;
    ``grouped``: GroupedPrompts; ``baselines``: the ``table.json`` dictionary of
    :func:`spare_tl.studies.baselines.run_table` or its method → result mapping; ``probes``: a
    :class:`SavedProbeStudy` or :class:`spare_tl.studies.probes.ProbeStudy`; ``original``: an
    ``OriginalCache`` (the paper's data); ``scan``: a :class:`spare_tl.stages.scan.ScanResult`, drawn
    beside the layer-wise mutual information. Parts not given are listed in the page's "missing"
    box together with ``missing``; the baselines and the probe study, optional studies, only
    say so in their own sections.
    """
    notes = list(missing)
    page = _Page()
    statistics = dict(statistics or {})
    result_items = list(results.items()) if isinstance(results, Mapping) else list(results or [])

    # -- steering results ---------------------------------------------------------------
    page.add("<h2>Steering results</h2>")
    if not result_items:
        page.add("<p class='missing'>No steering results.</p>")
        _note_absent(notes, "results", "steering results: none given")
    baseline = None
    for _name, data in result_items:
        if classify_result(data) == "evaluation":
            baseline = baseline or data.get("no_steering")
    for name, data in result_items:
        kind = classify_result(data)
        if kind == "evaluation":
            page.add(evaluation_html(name, data))
            page.attempt(f"results {name}", lambda d=data: steering_results(d), notes)
        elif kind == "sweep":
            page.add(f"<h3>{html.escape(name)}: sweep</h3>")
            recs = _records(data)
            for x in ("proportion", "edit_strength"):
                if len({r.get(x) for r in recs}) > 1:
                    page.attempt(
                        f"sweep {name} over {x}",
                        lambda r=recs, x=x: steering_sweep(r, x=x, baseline=baseline),
                        notes,
                    )
        elif kind == "layers":
            page.add(f"<h3>{html.escape(name)}: one layer at a time</h3>")
            page.attempt(
                f"per-layer steering {name}",
                lambda d=data: layer_steering_effect(_records(d), baseline=baseline),
                notes,
            )
        else:
            notes.append(f"results {name}: not an evaluation result, sweep or per-layer records")

    _baselines_section(page, baselines, notes)

    # -- functional features ------------------------------------------------------------
    page.add("<h2>Functional features</h2>")
    if features is not None:
        page.add(counts_html(features))
    else:
        page.add("<p class='missing'>No functional features.</p>")
        _note_absent(notes, "functional features", "functional features: none given")
    if statistics:
        proportion = features.proportion if features is not None else DEFAULT_PROPORTION
        steered = features.all_layers if features is not None else []
        page.attempt(
            "mutual information per layer",
            lambda: layerwise_mutual_information(
                statistics, proportion=proportion, highlight_layers=steered
            ),
            notes,
        )
        layer = _focus_layer(statistics, steered)
        layer_features = _layer_features(features, layer)
        page.attempt(
            f"MI against expectation at layer {layer}",
            lambda: mutual_information_scatter(
                statistics[layer],
                features=layer_features,
                proportion=None if layer_features is not None else proportion,
                layer=layer,
                top_n=top_n,
            ),
            notes,
        )
        for lay in steered or [layer]:
            if lay in statistics:
                page.add(
                    layer_drivers(
                        statistics[lay],
                        layer=lay,
                        features=_layer_features(features, lay),
                        proportion=None if features is not None else proportion,
                    ).to_html()
                )
    else:
        page.add("<p class='missing'>No per-layer feature statistics.</p>")
        _note_absent(notes, "statistics", "feature statistics (mutual information): none given")
    if features is not None:
        _cards_section(page, features, statistics, examples, effects)

    # -- steerability scan --------------------------------------------------------------
    if scan is not None:
        page.add(
            "<h2>Where the model can be steered</h2><p>EM on development questions after "
            "patching the last prompt position of one layer and site from a donor run that "
            "answers from memory (closed-book) or from the context; the bottom panel is the "
            "layer-wise mutual information of the SAE latents.</p>"
        )
        page.attempt(
            "steerability scan",
            lambda: steerability_scan(
                scan,
                statistics or None,
                highlight_layers=features.all_layers if features is not None else (),
            ),
            notes,
        )

    # -- grouped prompts ----------------------------------------------------------------
    page.add("<h2>Behaviour of the grouped prompts</h2>")
    if grouped is not None:
        page.attempt("behaviour table", lambda: behaviour_table(grouped), notes)
    else:
        page.add("<p class='missing'>No grouped prompts.</p>")
        _note_absent(notes, "grouped prompts", "grouped prompts: none given")

    _probes_section(page, probes, notes)

    # -- the paper's cache --------------------------------------------------------------
    if original is not None:
        _original_section(page, original, original_layer, notes, top_n)

    body = "\n".join(page.parts)
    missing_html = ""
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        missing_html = (
            f"<div class='missing' id='missing'><b>Missing parts</b><ul>{items}</ul></div>"
        )
    plotly_js = ""
    if page.n_figures or page.n_cards:
        plotly_js = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>{plotly_js}</head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>spare-tl, {stamp}. SpARE (Zhao et al., "
        "NAACL 2025): steering knowledge selection between the context and parametric memory "
        "with SAE features.</p>"
        f"{missing_html}{body}</body></html>\n"
    )


def _cards_section(
    page: _Page, features: Any, statistics: Mapping[int, Any], examples: Any, effects: Any
) -> None:
    """The causal-effect overview and a collapsible card per functional feature."""
    cards = functional_feature_cards(
        features, statistics=statistics, examples=examples, effects=effects
    )
    page.add("<h3>Feature cards</h3>")
    if effects is not None:
        page.add(effects_overview_html(effects, cards))
    page.add(
        f"<p class='meta'>{len(cards)} functional features, largest causal effect first; "
        "click one to open its card.</p>"
    )
    for i, card in enumerate(cards, start=1):
        page.n_cards += 1  # their figures need plotly's JavaScript too
        page.add(card.to_html(div_id=f"card-{i}"))


def _baselines_section(page: _Page, baselines: Mapping[str, Any] | None, notes: list[str]) -> None:
    page.add("<h2>Baselines</h2>")
    if not baselines:
        page.add(
            "<p class='missing'>No baselines (<code>spare-tl baselines table</code> "
            "writes them).</p>"
        )
        return
    page.add(
        "<p class='meta'>SpARE against other ways of steering in the same harness: the same "
        "prompts, demonstrations, greedy decoding, exact match and held-out questions, each "
        "method's settings chosen on the development (pool) questions only.</p>"
    )
    _table(page, "baselines: the table", lambda: baselines_html(baselines), notes)
    page.attempt("baselines: method comparison", lambda: method_comparison(baselines), notes)


def _table(page: _Page, what: str, make: Callable[[], str], notes: list[str]) -> None:
    """Add ``make()``'s HTML table; a failure (malformed saved data) becomes a note."""
    try:
        page.add(make())
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        notes.append(f"{what} could not be written ({first_line(e)})")
        page.add(f"<p class='missing'>{html.escape(what)} could not be written.</p>")


def _probes_section(page: _Page, probes: SavedProbeStudy | Any | None, notes: list[str]) -> None:
    page.add("<h2>Detecting the conflict</h2>")
    if probes is None:
        page.add(
            "<p class='missing'>No conflict probes (<code>spare-tl probes</code> writes them).</p>"
        )
        return
    resid, sae, probe = probes.resid, probes.sae, getattr(probes, "probe", None)
    latents = {
        int(k): v.to_json() if hasattr(v, "to_json") else v
        for k, v in (probes.latents or {}).items()
    }
    conditional = probes.conditional
    page.add(
        "<p class='meta'>Does the residual stream register the knowledge conflict? Linear "
        "probes tell prompts with a conflicting context (<code>sub_context</code>) from the "
        "same prompts with a consistent one (<code>org_context</code>) on held-out questions; "
        "which SAE latents carry the signal, and whether they are SpARE's functional features; "
        "and steering only when the probe flags a conflict.</p>"
    )
    page.add("<h3>Probe quality by layer</h3>")
    if resid is not None or sae is not None:
        page.attempt(
            "conflict-probe quality by layer",
            lambda: probe_quality_by_layer(*[r for r in (resid, sae) if r is not None]),
            notes,
        )
    if resid is None:
        page.add("<p class='missing'>No residual-stream probe results.</p>")
    else:
        _table(
            page, "probes: the probe table", lambda: probe_quality_html(resid, sae, probe), notes
        )

    page.add("<h3>Which SAE latents carry the conflict</h3>")
    if latents:
        _table(page, "probes: the conflict latents table", lambda: latents_html(latents), notes)
    else:
        page.add("<p class='missing'>No conflict latents (latents.json).</p>")

    page.add("<h3>Steering only on a detected conflict</h3>")
    if conditional is None:
        page.add("<p class='missing'>No conditional steering results.</p>")
    else:
        _table(
            page,
            "probes: the conditional steering table",
            lambda: conditional_html(conditional),
            notes,
        )


def _original_section(
    page: _Page, original: Any, layer: int | None, notes: list[str], top_n: int
) -> None:
    name = original.model_name
    setting = PAPER_SETTINGS.get(name)
    proportion = setting.proportion if setting else 0.07
    steered = list(setting.layers) if setting else []
    page.add(f"<h2>The paper's cache: {html.escape(name)}</h2>")
    page.add(
        "<p class='meta'>Mutual information and expectation from the SpARE authors' released "
        f"cache; selection at their proportion K = {proportion:g}"
        + (f", steered layers {steered}" if steered else "")
        + ".</p>"
    )
    try:
        stats = {lay: original.statistics(lay) for lay in original.mi_layers()}
    except (FileNotFoundError, ValueError) as e:
        notes.append(f"the paper's cache: {first_line(e)}")
        stats = {}
    if stats:
        page.attempt(
            f"{name}: mutual information per layer",
            lambda: layerwise_mutual_information(
                stats,
                proportion=proportion,
                highlight_layers=steered,
                title=f"{name}: mutual information per layer (paper's cache)",
            ),
            notes,
        )
        focus = layer if layer is not None else _focus_layer(stats, steered)
        if focus not in stats:
            notes.append(f"the paper's cache: no statistics for layer {focus}")
        else:
            z_c = z_m = None
            if focus in original.functional_layers():
                z_c, z_m = original.functional_activations(focus)
            page.attempt(
                f"{name}: MI against expectation at layer {focus}",
                lambda: mutual_information_scatter(
                    stats[focus],
                    proportion=proportion,
                    context_activations=z_c,
                    memory_activations=z_m,
                    layer=focus,
                    top_n=top_n,
                    title=f"{name}: mutual information against expectation at layer {focus}",
                ),
                notes,
            )

            with_z = SimpleNamespace(
                mutual_information=stats[focus].mutual_information,
                expectation=stats[focus].expectation,
                context_activations=z_c,
                memory_activations=z_m,
            )
            page.add(layer_drivers(with_z, layer=focus, proportion=proportion).to_html())
    try:
        records = original.grouped_prompts()
    except (FileNotFoundError, ValueError) as e:
        notes.append(f"the paper's grouped prompts: {first_line(e)}")
        records = []
    if records:
        page.attempt(
            f"{name}: behaviour table",
            lambda: behaviour_table(
                records, title=f"{name}: behaviour of the grouped prompts (paper's cache)"
            ),
            notes,
        )
