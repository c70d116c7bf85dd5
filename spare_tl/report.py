"""One self-contained HTML page with SpARE's figures and results (``spare-tl report``).

:func:`build_report` takes the library's objects (functional features, per-layer statistics,
evaluation results, sweeps, grouped prompts, the baselines' comparison table, the conflict-probe
study, the paper's cache) and returns the page as a string: plotly's JavaScript is inlined
once, so the file opens offline. Parts that are not given are listed as missing instead of
failing. :func:`load_report_inputs` is the one place that reads them from disk (defaults: the
embedded model's ``cache_data/``).

:func:`find_chromium` and :func:`screenshot` render a page with headless Chromium (used by
the browser test and for the README image).
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from spare_tl import cache

if TYPE_CHECKING:  # plotly and the figures load lazily: `spare-tl --help` stays fast
    import plotly.graph_objects as go

logger = logging.getLogger(__name__)

__all__ = [
    "CHROMIUM_FLAGS",
    "ReportInputs",
    "SavedProbeStudy",
    "build_report",
    "classify_result",
    "find_chromium",
    "load_report_inputs",
    "register",
    "screenshot",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
CONDITION_NAMES = {
    "no_steering": "no steering",
    "steer_to_context": "steer to context",
    "steer_to_memory": "steer to memory",
}
DEFAULT_PROPORTION = 0.05
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
)

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
"""


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass
class ReportInputs:
    """What a report shows; ``missing`` says which parts were not found and why."""

    features: Any | None = None
    statistics: dict[int, Any] = field(default_factory=dict)
    results: list[tuple[str, Any]] = field(default_factory=list)
    grouped: Any | None = None
    baselines: dict[str, Any] | None = None
    probes: SavedProbeStudy | None = None
    original: Any | None = None
    scan: Any | None = None  # spare_tl.scan.ScanResult
    missing: list[str] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`build_report`."""
        return {
            "features": self.features,
            "statistics": self.statistics,
            "results": self.results,
            "grouped": self.grouped,
            "baselines": self.baselines,
            "probes": self.probes,
            "original": self.original,
            "scan": self.scan,
            "missing": self.missing,
        }


@dataclass
class SavedProbeStudy:
    """What :func:`spare_tl.probes.run_probe_study` saved, as the report shows it.

    ``resid`` / ``sae``: :class:`~spare_tl.probes.ProbeResults`; ``probe``: the deployed
    :class:`~spare_tl.probes.ConflictProbe`; ``latents``: layer → ``ConflictLatents.to_json()``
    (``latents.json``); ``conditional``: a :class:`~spare_tl.probes.ConditionalResult`. A
    :class:`~spare_tl.probes.ProbeStudy` has the same attributes and can be given instead.
    """

    resid: Any | None = None
    sae: Any | None = None
    probe: Any | None = None
    latents: dict[int, Any] = field(default_factory=dict)
    conditional: Any | None = None


def _statistics_files(directory: Path) -> list[Path]:
    return sorted(
        set(directory.glob("layer*/layer*.safetensors")) | set(directory.glob("layer*.safetensors"))
    )


def load_report_inputs(
    *,
    features: str | Path | None = None,
    statistics: str | Path | None = None,
    results: Sequence[str | Path] | None = None,
    grouped: str | Path | None = None,
    baselines: str | Path | None = None,
    probes: str | Path | None = None,
    original: str | Path | None = None,
    scan: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    cache_root: Path | None = None,
) -> ReportInputs:
    """Read the report's inputs; a part left out defaults to ``cache_data/<model>/<stage>``.

    ``baselines`` and ``probes`` (the folders :mod:`spare_tl.baselines` and
    :mod:`spare_tl.probes` write) default to ``cache_data/<model>/baselines`` and
    ``.../probes``, or to the functional features' model's folder when only that one has them.
    Nothing raises for a missing or unreadable part: it is recorded in ``missing``.
    """
    from spare_tl.activations import LayerStatistics
    from spare_tl.behaviours import GroupedPrompts
    from spare_tl.features import FunctionalFeatures
    from spare_tl.original import OriginalCache

    out = ReportInputs()

    def where(given: str | Path | None, stage: str) -> Path:
        return Path(given) if given is not None else cache.stage_dir(model, stage, cache_root)

    path = where(features, "functional_features")
    if not (path / "features.json").is_file():
        out.missing.append(f"functional features: none in {path} (no features.json)")
    else:
        try:
            out.features = FunctionalFeatures.load(path)
        except (OSError, ValueError, KeyError) as e:
            out.missing.append(f"functional features: cannot read {path} ({_first_line(e)})")

    path = where(statistics, "mutual_information")
    files = _statistics_files(path) if path.is_dir() else []
    for f in files:
        try:
            s = LayerStatistics.load(f)
            out.statistics[s.layer] = s
        except Exception as e:  # noqa: BLE001 - report, do not fail
            out.missing.append(f"feature statistics: cannot read {f} ({_first_line(e)})")
    if not files:
        out.missing.append(
            f"feature statistics (mutual information per layer): none in {path} "
            "(expected layer*/layer*.safetensors)"
        )

    result_paths: list[Path] = []
    for p in [Path(r) for r in results] if results else [where(None, "results")]:
        result_paths += sorted(p.glob("*.json")) if p.is_dir() else [p]
    for p in result_paths:
        if not p.is_file():
            out.missing.append(f"steering results: nothing at {p}")
            continue
        try:
            out.results.append((p.stem, cache.read_json(p)))
        except (OSError, ValueError) as e:
            out.missing.append(f"steering results: cannot read {p} ({_first_line(e)})")
    if not result_paths:
        shown = ", ".join(str(r) for r in results) if results else str(where(None, "results"))
        out.missing.append(f"steering results: no JSON files in {shown}")

    path = where(grouped, "grouped_prompts")
    if not (path / "records.jsonl").is_file():
        out.missing.append(f"grouped prompts: none in {path} (no records.jsonl)")
    else:
        try:
            out.grouped = GroupedPrompts.load(path)
        except (OSError, ValueError, KeyError) as e:
            out.missing.append(f"grouped prompts: cannot read {path} ({_first_line(e)})")

    def study_dir(given: str | Path | None, stage: str) -> Path:
        if given is not None:
            return Path(given)
        names = [model]
        if out.features is not None and out.features.model_name != model:
            names.append(out.features.model_name)
        dirs = [cache.stage_dir(name, stage, cache_root) for name in names]
        return next((d for d in dirs if d.is_dir()), dirs[0])

    out.baselines = _load_baselines(study_dir(baselines, "baselines"), out.missing)
    out.probes = _load_probes(study_dir(probes, "probes"), out.missing)
    scan_dir = study_dir(scan, "scan")
    if (scan_dir / "scan.json").is_file():
        from spare_tl.scan import ScanResult

        try:
            out.scan = ScanResult.load(scan_dir)
        except (OSError, ValueError, KeyError) as e:
            out.missing.append(f"steerability scan: cannot read {scan_dir} ({_first_line(e)})")

    if original is not None:
        try:
            out.original = OriginalCache(original)
        except FileNotFoundError as e:
            out.missing.append(f"the paper's cache: {_first_line(e)}")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_baselines(path: Path, missing: list[str]) -> dict[str, Any] | None:
    """``table.json`` of :func:`spare_tl.baselines.run_table`, else its per-method results
    (``<method>.json``) as a method → result mapping."""
    if not path.is_dir():
        missing.append(
            f"baselines: none in {path} (run `python -m spare_tl.baselines table` first)"
        )
        return None
    table = path / "table.json"
    try:
        if table.is_file():
            data = cache.read_json(table)
            if not isinstance(data, Mapping) or not isinstance(data.get("rows"), list):
                raise ValueError("table.json has no rows")
            return dict(data)
        results = {}
        for p in sorted(path.glob("*.json")):
            if p.stem.startswith("sweep-"):
                continue
            data = cache.read_json(p)
            if isinstance(data, Mapping) and "method" in data and "no_steering" in data:
                results[p.stem] = data
    except (OSError, ValueError) as e:
        missing.append(f"baselines: cannot read {path} ({_first_line(e)})")
        return None
    if not results:
        missing.append(f"baselines: no table.json or <method>.json results in {path}")
        return None
    return results


def _load_probes(path: Path, missing: list[str]) -> SavedProbeStudy | None:
    """The probe study's results under ``path`` (the layout of
    :func:`spare_tl.probes.run_probe_study`); each part that is absent is noted."""
    from spare_tl.probes import ConditionalResult, ConflictProbe, ProbeResults

    if not path.is_dir():
        missing.append(
            f"probes (detecting the conflict): none in {path} "
            "(run `python -m spare_tl.probes run` first)"
        )
        return None
    out = SavedProbeStudy()
    parts: list[tuple[str, str, Any]] = [
        ("resid", "resid/results.json", ProbeResults.load),
        ("sae", "sae/results.json", ProbeResults.load),
        ("probe", "conflict_probe/conflict_probe.safetensors", ConflictProbe.load),
        ("latents", "latents.json", lambda p: {int(k): v for k, v in cache.read_json(p).items()}),
        ("conditional", "conditional/results.json", ConditionalResult.load),
    ]
    for name, rel, load in parts:
        file = path / rel
        if not file.is_file():
            if name != "probe":  # the deployed probe is a detail of the table
                missing.append(f"probes: no {rel} in {path}")
            continue
        try:
            setattr(out, name, load(file))
        except Exception as e:  # noqa: BLE001 - report, do not fail
            missing.append(f"probes: cannot read {file} ({_first_line(e)})")
    if out.resid is None and out.sae is None and not out.latents and out.conditional is None:
        return None
    return out


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


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


def _pm(mean: Any, std: Any) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def _evaluation_table(name: str, data: Mapping[str, Any]) -> str:
    e = html.escape
    rows = ""
    for cond, label in CONDITION_NAMES.items():
        if cond not in data:
            continue
        s = data[cond]
        rows += (
            f"<tr><td>{label}</td><td>{_pm(s.get('EM_C'), s.get('EM_C_std'))}</td>"
            f"<td>{_pm(s.get('EM_M'), s.get('EM_M_std'))}</td>"
            f"<td>{_pm(s.get('neither'), None)}</td></tr>"
        )
    meta = ", ".join(
        f"{k}: {e(str(data[k]))}" for k in ("model", "dataset", "n_items", "demo_type") if k in data
    )
    if data.get("seeds"):
        meta += f", seeds: {e(str(list(data['seeds'])))}"
    feats = data.get("features")
    if isinstance(feats, Mapping):
        meta += (
            f"<br>layers {e(str(feats.get('layers')))}, proportion K = "
            f"{e(str(feats.get('proportion')))}, edit strength α = "
            f"{e(str(feats.get('edit_strength')))}"
        )
        if feats.get("edit_strength_to_memory") is not None:
            meta += f" (to memory: {e(str(feats['edit_strength_to_memory']))})"
        mem = feats.get("to_memory")
        if isinstance(mem, Mapping):
            meta += (
                f" (to context); to memory: layers {e(str(mem.get('layers')))}, K = "
                f"{e(str(mem.get('proportion')))}, α = {e(str(mem.get('edit_strength')))}"
            )
    out = (
        f"<h3>{e(name)}</h3><p class='meta'>{meta}</p>"
        "<table><tr><th>condition</th><th>EM_C (%)</th><th>EM_M (%)</th><th>neither (%)</th>"
        f"</tr>{rows}</table>"
    )
    trans = data.get("transitions") or {}
    if trans:
        cells = "".join(
            f"<tr><td>{e(k)}</td><td>{_pm(v.get('mean'), v.get('std'))}</td></tr>"
            for k, v in trans.items()
        )
        out += f"<table><tr><th>transition</th><th>% (mean ± std)</th></tr>{cells}</table>"
    return out


# --------------------------------------------------------------------------------------
# Markdown tables of the study modules
# --------------------------------------------------------------------------------------

_CODE = re.compile(r"`([^`]+)`")
_SEPARATOR = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def _inline(text: str) -> str:
    return _CODE.sub(r"<code>\1</code>", html.escape(text, quote=False)).replace("\\*", "*")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _markdown_table(lines: Sequence[str]) -> str:
    head, body = lines[0], list(lines[1:])
    left: list[bool] = []
    if body and _SEPARATOR.match(body[0]):
        left = [not c.endswith(":") for c in _cells(body.pop(0))]

    def row(line: str, tag: str) -> str:
        return (
            "<tr>"
            + "".join(
                f"<{tag} class='left'>{_inline(c)}</{tag}>"
                if i < len(left) and left[i]
                else f"<{tag}>{_inline(c)}</{tag}>"
                for i, c in enumerate(_cells(line))
            )
            + "</tr>"
        )

    return "<table>" + row(head, "th") + "".join(row(b, "td") for b in body) + "</table>"


def _markdown_html(text: str) -> str:
    """HTML of the markdown that :mod:`spare_tl.baselines` and :mod:`spare_tl.probes` write
    for the README: pipe tables, ``- `` lists, paragraphs and `code`."""
    blocks: list[str] = []
    lines = [line.strip() for line in text.splitlines()]
    i = 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        start = i
        if lines[i].startswith("|"):
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            blocks.append(_markdown_table(lines[start:i]))
        elif lines[i].startswith("- "):
            while i < len(lines) and lines[i].startswith("- "):
                i += 1
            items = "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[start:i])
            blocks.append(f"<ul class='meta'>{items}</ul>")
        else:
            while i < len(lines) and lines[i] and not lines[i].startswith(("|", "- ")):
                i += 1
            blocks.append(f"<p class='meta'>{_inline(' '.join(lines[start:i]))}</p>")
    return "\n".join(blocks)


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n_figures = 0

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

    def attempt(self, what: str, make: Any, missing: list[str]) -> None:
        """Add ``make()``'s figure; a failure becomes a note, not a broken page."""
        try:
            fig = make()
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            logger.warning("report: %s skipped: %s", what, e)
            missing.append(f"{what}: could not be drawn ({_first_line(e)})")
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


def _counts_table(features: Any) -> str:
    rows = "".join(
        f"<tr><td>{layer}</td><td>{c}</td><td>{m}</td></tr>"
        for layer, (c, m) in features.counts().items()
    )
    a_mem = features.edit_strength_to_memory
    strength = f"{features.edit_strength:g}" + (
        f" (to memory: {a_mem:g})" if a_mem is not None else ""
    )
    if features.to_memory is not None:
        m = features.to_memory
        strength += (
            f" (to context); steering to memory uses its own set: layers {sorted(m.layers)}, "
            f"K = {m.proportion:g}, α = {m.strength('memory'):g}, features per layer "
            f"{m.counts()}"
        )
    return (
        f"<p class='meta'>model {html.escape(features.model_name)}, proportion K = "
        f"{features.proportion:g}, edit strength α = {strength}</p>"
        "<table><tr><th>layer</th><th>context features</th><th>memory features</th></tr>"
        f"{rows}</table>"
    )


def _focus_layer(statistics: Mapping[int, Any], preferred: Sequence[int]) -> int:
    from spare_tl import figures as F

    for layer in preferred:
        if layer in statistics:
            return layer
    return max(statistics, key=lambda k: float(F._clean_mi(statistics[k].mutual_information).sum()))


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
    missing: Sequence[str] = (),
    title: str = "SpARE report",
    top_n: int = 2000,
) -> str:
    """The report as one self-contained HTML page (plotly's JavaScript inlined once).

    ``features``: a FunctionalFeatures set; ``statistics``: layer → LayerStatistics;
    ``results``: (name, JSON) pairs or a name → JSON mapping of evaluation results, sweeps
    ({proportion, edit_strength, direction, EM_C, EM_M} lists) or per-layer records;
    ``grouped``: GroupedPrompts; ``baselines``: the ``table.json`` dictionary of
    :func:`spare_tl.baselines.run_table` or its method → result mapping; ``probes``: a
    :class:`SavedProbeStudy` or :class:`spare_tl.probes.ProbeStudy`; ``original``: an
    ``OriginalCache`` (the paper's data); ``scan``: a :class:`spare_tl.scan.ScanResult`, drawn
    beside the layer-wise mutual information. Parts not given are listed in the page's "missing"
    box together with ``missing``; the baselines and the probe study, optional studies, only
    say so in their own sections.
    """
    from spare_tl import figures as F
    from spare_tl.inspector import layer_drivers

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
            page.add(_evaluation_table(name, data))
            page.attempt(f"results {name}", lambda d=data: F.steering_results(d), notes)
        elif kind == "sweep":
            page.add(f"<h3>{html.escape(name)}: sweep</h3>")
            recs = _records(data)
            for x in ("proportion", "edit_strength"):
                if len({r.get(x) for r in recs}) > 1:
                    page.attempt(
                        f"sweep {name} over {x}",
                        lambda r=recs, x=x: F.steering_sweep(r, x=x, baseline=baseline),
                        notes,
                    )
        elif kind == "layers":
            page.add(f"<h3>{html.escape(name)}: one layer at a time</h3>")
            page.attempt(
                f"per-layer steering {name}",
                lambda d=data: F.layer_steering_effect(_records(d), baseline=baseline),
                notes,
            )
        else:
            notes.append(f"results {name}: not an evaluation result, sweep or per-layer records")

    _baselines_section(page, baselines, notes)

    # -- functional features ------------------------------------------------------------
    page.add("<h2>Functional features</h2>")
    if features is not None:
        page.add(_counts_table(features))
    else:
        page.add("<p class='missing'>No functional features.</p>")
        _note_absent(notes, "functional features", "functional features: none given")
    if statistics:
        proportion = features.proportion if features is not None else DEFAULT_PROPORTION
        steered = features.all_layers if features is not None else []
        page.attempt(
            "mutual information per layer",
            lambda: F.layerwise_mutual_information(
                statistics, proportion=proportion, highlight_layers=steered
            ),
            notes,
        )
        layer = _focus_layer(statistics, steered)
        layer_features = _layer_features(features, layer)
        page.attempt(
            f"MI against expectation at layer {layer}",
            lambda: F.mutual_information_scatter(
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
            lambda: F.steerability_scan(
                scan,
                statistics or None,
                highlight_layers=features.all_layers if features is not None else (),
            ),
            notes,
        )

    # -- grouped prompts ----------------------------------------------------------------
    page.add("<h2>Behaviour of the grouped prompts</h2>")
    if grouped is not None:
        page.attempt("behaviour table", lambda: F.behaviour_table(grouped), notes)
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
    if page.n_figures:
        from plotly.offline import get_plotlyjs

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


def _baselines_section(page: _Page, baselines: Mapping[str, Any] | None, notes: list[str]) -> None:
    from spare_tl import figures as F

    page.add("<h2>Baselines</h2>")
    if not baselines:
        page.add(
            "<p class='missing'>No baselines (<code>python -m spare_tl.baselines table</code> "
            "writes them).</p>"
        )
        return
    page.add(
        "<p class='meta'>SpARE against other ways of steering in the same harness: the same "
        "prompts, demonstrations, greedy decoding, exact match and held-out questions, each "
        "method's settings chosen on the development (pool) questions only.</p>"
    )
    try:
        if isinstance(baselines.get("rows"), list):  # table.json
            markdown = baselines["markdown"]
        else:
            from spare_tl.baselines import baseline_table

            markdown = baseline_table(baselines)
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        notes.append(f"baselines: the table could not be written ({_first_line(e)})")
        page.add("<p class='missing'>baselines: the table could not be written.</p>")
    else:
        page.add(_markdown_html(markdown))
    page.attempt("baselines: method comparison", lambda: F.method_comparison(baselines), notes)


def _latent_table(latents: Mapping[int, Mapping[str, Any]], shown: int = 5) -> str:
    """One row per layer of ``latents.json``: overlaps of the conflict latents with SpARE's
    functional features, against chance."""
    rows = ""
    for layer, lat in sorted(latents.items()):
        ov = lat["overlap"]
        ctx = {d["latent"] for d in lat["context_features"]}
        mem = {d["latent"] for d in lat["memory_features"]}
        n = max(len(lat["top_by_weight"]), len(lat["top_by_mutual_information"]))
        top = ", ".join(
            f"{d['latent']}"
            + (" (C)" if d["latent"] in ctx else " (M)" if d["latent"] in mem else "")
            for d in lat["top_by_weight"][:shown]
        )
        rows += (
            f"<tr><td>{layer}</td><td>{n}</td><td>{len(ctx)} + {len(mem)}</td>"
            f"<td>{ov['weight&context']} / {ov['weight&memory']}</td>"
            f"<td>{ov['mutual_information&context']} / {ov['mutual_information&memory']}</td>"
            f"<td>{lat['expected_overlap_by_chance']:.2f}</td><td>{lat['n_active']}</td>"
            f"<td>{lat['n_nonzero_weights']}</td><td class='left'>{top or '–'}</td></tr>"
        )
    return (
        "<table><tr><th>layer</th><th>top n</th><th>context + memory features</th>"
        "<th>top n by |probe weight| ∩ context / memory features</th>"
        "<th>top n by MI with the conflict label ∩ context / memory features</th>"
        "<th>overlap expected by chance</th><th>active latents</th>"
        f"<th>non-zero probe weights</th><th class='left'>top {shown} by |probe weight| "
        f"(C / M: context / memory feature)</th></tr>{rows}</table>"
    )


def _probes_section(page: _Page, probes: Any | None, notes: list[str]) -> None:
    from spare_tl import figures as F
    from spare_tl.probes import probes_table

    page.add("<h2>Detecting the conflict</h2>")
    if probes is None:
        page.add(
            "<p class='missing'>No conflict probes (<code>python -m spare_tl.probes run</code> "
            "writes them).</p>"
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
            lambda: F.probe_quality_by_layer(*[r for r in (resid, sae) if r is not None]),
            notes,
        )
    if resid is None:
        page.add("<p class='missing'>No residual-stream probe results.</p>")
    table = ""
    if resid is not None:
        try:
            table = probes_table(resid, sae, probe=probe)
        except (KeyError, TypeError, ValueError) as e:
            notes.append(f"probes: the probe table could not be written ({_first_line(e)})")
            page.add("<p class='missing'>probes: the probe table could not be written.</p>")
        page.add(_markdown_html(table))

    page.add("<h3>Which SAE latents carry the conflict</h3>")
    if latents:
        try:
            page.add(_latent_table(latents))
        except (KeyError, TypeError, ValueError) as e:
            notes.append(f"probes: latents.json could not be shown ({_first_line(e)})")
            page.add("<p class='missing'>probes: latents.json could not be shown.</p>")
    else:
        page.add("<p class='missing'>No conflict latents (latents.json).</p>")

    page.add("<h3>Steering only on a detected conflict</h3>")
    if conditional is None:
        page.add("<p class='missing'>No conditional steering results.</p>")
    elif resid is None:
        page.add(
            "<p class='missing'>The conditional steering results are shown with the "
            "residual-stream probe results, which are missing.</p>"
        )
    else:
        try:
            full = probes_table(resid, sae, probe=probe, conditional=conditional)
        except (KeyError, TypeError, ValueError) as e:
            notes.append(f"probes: the conditional steering table failed ({_first_line(e)})")
            page.add("<p class='missing'>probes: the conditional steering table failed.</p>")
        else:
            # probes_table appends the conditional part after the probe table
            page.add(_markdown_html(full.removeprefix(table) if table else full))


def _original_section(
    page: _Page, original: Any, layer: int | None, notes: list[str], top_n: int
) -> None:
    from spare_tl import figures as F
    from spare_tl.inspector import layer_drivers
    from spare_tl.original import PAPER_SETTINGS

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
        notes.append(f"the paper's cache: {_first_line(e)}")
        stats = {}
    if stats:
        page.attempt(
            f"{name}: mutual information per layer",
            lambda: F.layerwise_mutual_information(
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
                lambda: F.mutual_information_scatter(
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
        notes.append(f"the paper's grouped prompts: {_first_line(e)}")
        records = []
    if records:
        page.attempt(
            f"{name}: behaviour table",
            lambda: F.behaviour_table(
                records, title=f"{name}: behaviour of the grouped prompts (paper's cache)"
            ),
            notes,
        )


# --------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary (``$CHROMIUM`` first), or None."""
    candidates = [os.environ.get("CHROMIUM", "")]
    candidates += ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    for c in candidates:
        if c and (path := shutil.which(c)):
            return path
    return None


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1100,
    height: int = 700,
    chromium: str | None = None,
    budget_ms: int = 5000,
    timeout: float = 180.0,
) -> Path:
    """Render ``html_path`` with headless Chromium and save a PNG of the window."""
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium found: apt-get install chromium (or set $CHROMIUM)")
    png_path = Path(png_path).resolve()
    with tempfile.TemporaryDirectory(prefix="spare-tl-chromium-") as profile:
        subprocess.run(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={png_path}",
                Path(html_path).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    return png_path


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``spare-tl report``."""
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page with the figures and results",
        description=(
            "Draw the layer-wise mutual information, MI against expectation, the behaviour "
            "table, the steering results, the baselines and the conflict probes on one HTML "
            "page that opens offline. Parts not "
            f"given default to cache_data/<model>/ (model: {DEFAULT_MODEL}); missing ones "
            "are listed on the page."
        ),
    )
    p.add_argument("--features", type=Path, help="functional-feature folder")
    p.add_argument("--statistics", type=Path, help="mutual_information folder (layer*/...)")
    p.add_argument("--results", type=Path, nargs="+", help="results JSON files or folders")
    p.add_argument("--grouped", type=Path, help="grouped_prompts folder")
    p.add_argument(
        "--baselines", type=Path, metavar="DIR", help="baselines folder (table.json, <method>.json)"
    )
    p.add_argument(
        "--probes",
        type=Path,
        metavar="DIR",
        help="probes folder (resid/, sae/, latents.json, conditional/)",
    )
    p.add_argument("--scan", type=Path, metavar="DIR", help="steerability scan folder (scan.json)")
    p.add_argument("--original", type=Path, help="a model folder of the paper's cache")
    p.add_argument("--original-layer", type=int, help="layer of the paper's cache to inspect")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose cache_data/ to use")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--output", type=Path, required=True, help="the HTML file to write")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    inputs = load_report_inputs(
        features=args.features,
        statistics=args.statistics,
        results=args.results,
        grouped=args.grouped,
        baselines=args.baselines,
        probes=args.probes,
        original=args.original,
        scan=args.scan,
        model=args.model,
    )
    text = build_report(
        **inputs.kwargs(),
        original_layer=args.original_layer,
        title=args.title or f"SpARE report: {args.model}",
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    for note in inputs.missing:
        print(f"missing: {note}")
    print(f"wrote {args.output} ({len(text) / 1e6:.1f} MB)")
    return 0
