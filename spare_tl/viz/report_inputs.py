"""The report's inputs, read from disk in one place (``spare-tl report``'s defaults).

:func:`load_report_inputs` reads the library's saved stages (functional features, per-layer
statistics, evaluation results, grouped prompts, the steerability scan) and the optional
studies (the baselines' table, the conflict-probe study, through
:mod:`spare_tl.studies.saved`); a part left out defaults to ``cache_data/<model>/<stage>``.
Nothing raises for a missing part: :attr:`ReportInputs.missing` says what and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.embedded import EMBEDDED_MODEL as DEFAULT_MODEL
from spare_tl.errors import first_line
from spare_tl.features import FunctionalFeatures
from spare_tl.stages.behaviours import GroupedPrompts, behaviours_dir
from spare_tl.stages.feature_effects import STAGE as EFFECTS_STAGE
from spare_tl.stages.feature_effects import FeatureEffects, read_feature_effects
from spare_tl.stages.feature_examples import STAGE as EXAMPLES_STAGE
from spare_tl.stages.feature_examples import FeatureExamples
from spare_tl.stages.scan import ScanResult
from spare_tl.stages.statistics import LayerStatistics
from spare_tl.studies.original import OriginalCache
from spare_tl.studies.saved import (
    SavedProbeStudy,
    load_baselines,
    load_probe_study,
    statistics_files,
)

__all__ = ["DEFAULT_MODEL", "ReportInputs", "load_report_inputs"]


@dataclass
class ReportInputs:
    """What a report shows; ``missing`` says which parts were not found and why."""

    features: FunctionalFeatures | None = None
    statistics: dict[int, LayerStatistics] = field(default_factory=dict)
    results: list[tuple[str, Any]] = field(default_factory=list)  # (name, results JSON)
    grouped: GroupedPrompts | None = None
    baselines: dict[str, Any] | None = None  # table.json, or method -> result JSON
    probes: SavedProbeStudy | None = None
    original: OriginalCache | None = None
    scan: ScanResult | None = None
    examples: FeatureExamples | None = None
    effects: FeatureEffects | None = None
    missing: list[str] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`spare_tl.viz.report_page.build_report`."""
        return {
            "features": self.features,
            "statistics": self.statistics,
            "examples": self.examples,
            "effects": self.effects,
            "results": self.results,
            "grouped": self.grouped,
            "baselines": self.baselines,
            "probes": self.probes,
            "original": self.original,
            "scan": self.scan,
            "missing": self.missing,
        }


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

    ``baselines`` and ``probes`` (the folders :mod:`spare_tl.studies.baselines` and
    :mod:`spare_tl.studies.probes` write) default to ``cache_data/<model>/baselines`` and
    ``.../probes``, or to the functional features' model's folder when only that one has them.
    Nothing raises for a missing or unreadable part: it is recorded in ``missing``.
    """
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
            out.missing.append(f"functional features: cannot read {path} ({first_line(e)})")

    path = where(statistics, "mutual_information")
    files = statistics_files(path) if path.is_dir() else []
    for f in files:
        try:
            s = LayerStatistics.load(f)
            out.statistics[s.layer] = s
        except Exception as e:  # noqa: BLE001 - report, do not fail
            out.missing.append(f"feature statistics: cannot read {f} ({first_line(e)})")
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
            out.missing.append(f"steering results: cannot read {p} ({first_line(e)})")
    if not result_paths:
        shown = ", ".join(str(r) for r in results) if results else str(where(None, "results"))
        out.missing.append(f"steering results: no JSON files in {shown}")

    path = Path(grouped) if grouped is not None else behaviours_dir(model, cache_root)
    if not (path / "records.jsonl").is_file():
        out.missing.append(f"grouped prompts: none in {path} (no records.jsonl)")
    else:
        try:
            out.grouped = GroupedPrompts.load(path)
        except (OSError, ValueError, KeyError) as e:
            out.missing.append(f"grouped prompts: cannot read {path} ({first_line(e)})")

    def study_dir(given: str | Path | None, stage: str) -> Path:
        if given is not None:
            return Path(given)
        names = [model]
        if out.features is not None and out.features.model_name != model:
            names.append(out.features.model_name)
        dirs = [cache.stage_dir(name, stage, cache_root) for name in names]
        return next((d for d in dirs if d.is_dir()), dirs[0])

    out.baselines = load_baselines(study_dir(baselines, "baselines"), out.missing)
    out.probes = load_probe_study(study_dir(probes, "probes"), out.missing)
    scan_dir = study_dir(scan, "scan")
    if (scan_dir / "scan.json").is_file():
        try:
            out.scan = ScanResult.load(scan_dir)
        except (OSError, ValueError, KeyError) as e:
            out.missing.append(f"steerability scan: cannot read {scan_dir} ({first_line(e)})")

    for stage, what, load in (
        (EXAMPLES_STAGE, "feature examples", FeatureExamples.load),
        (EFFECTS_STAGE, "causal effect of each feature", read_feature_effects),
    ):
        folder = study_dir(None, stage)
        if not (folder / cache.CONFIG).is_file():
            out.missing.append(
                f"{what}: none in {folder} (`spare-tl features {stage.split('_')[1]}`)"
            )
            continue
        try:
            setattr(out, "examples" if stage == EXAMPLES_STAGE else "effects", load(folder))
        except (OSError, ValueError, KeyError) as e:
            out.missing.append(f"{what}: cannot read {folder} ({first_line(e)})")

    if original is not None:
        try:
            out.original = OriginalCache(original)
        except FileNotFoundError as e:
            out.missing.append(f"the paper's cache: {first_line(e)}")
    return out
