"""The saved outputs of the optional studies, read back as typed objects.

:func:`load_probe_study` reads what :func:`spare_tl.studies.probes.run_probe_study` wrote (a
:class:`SavedProbeStudy`); :func:`load_baselines` reads what
:func:`spare_tl.studies.baselines.run_table` wrote (``table.json``, else the per-method results). Both
are used by the report (:mod:`spare_tl.viz`) and by ``spare-tl docs``
(:mod:`spare_tl.cli.docs`); neither raises for a missing or unreadable part: it is
appended to ``missing`` and the loader returns what it could read (or None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.errors import first_line
from spare_tl.stages.statistics import LayerStatistics
from spare_tl.studies.probes import ConditionalResult, ConflictProbe, ProbeResults

__all__ = ["SavedProbeStudy", "load_baselines", "load_probe_study", "load_statistics"]


def statistics_files(directory: Path) -> list[Path]:
    """The per-layer statistics files of a ``mutual_information`` folder
    (``layer<k>/layer<k>.safetensors``, or flat ``layer<k>.safetensors``)."""
    return sorted(
        set(directory.glob("layer*/layer*.safetensors")) | set(directory.glob("layer*.safetensors"))
    )


def load_statistics(directory: str | Path) -> dict[int, LayerStatistics]:
    """The saved per-layer statistics (mutual information, expectation) of a
    ``mutual_information`` folder, by layer, e.g.
    ``load_statistics(spare_tl.EMBEDDED_DIR / "mutual_information")``."""
    directory = Path(directory)
    files = statistics_files(directory) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no feature statistics in {directory} (expected layer*/layer*.safetensors)"
        )
    out = {}
    for path in files:
        s = LayerStatistics.load(path)
        out[s.layer] = s
    return dict(sorted(out.items()))


@dataclass
class SavedProbeStudy:
    """What :func:`spare_tl.studies.probes.run_probe_study` saved, as the report shows it.

    ``resid`` / ``sae``: :class:`~spare_tl.studies.probes.ProbeResults`; ``probe``: the deployed
    :class:`~spare_tl.studies.probes.ConflictProbe`; ``latents``: layer → ``ConflictLatents.to_json()``
    (``latents.json``); ``conditional``: a :class:`~spare_tl.studies.probes.ConditionalResult`. A
    :class:`~spare_tl.studies.probes.ProbeStudy` has the same attributes and can be given instead.
    """

    resid: ProbeResults | None = None
    sae: ProbeResults | None = None
    probe: ConflictProbe | None = None
    latents: dict[int, Any] = field(default_factory=dict)
    conditional: ConditionalResult | None = None


def _read_latents(path: Path) -> dict[int, Any]:
    return {int(k): v for k, v in cache.read_json(path).items()}


def load_probe_study(
    directory: str | Path, missing: list[str] | None = None
) -> SavedProbeStudy | None:
    """The probe study saved under ``directory`` (the layout of
    :func:`spare_tl.studies.probes.run_probe_study`), or None when it holds no results.

    Each absent or unreadable part is noted in ``missing`` (when given).
    """
    path = Path(directory)
    notes = missing if missing is not None else []
    if not path.is_dir():
        notes.append(
            f"probes (detecting the conflict): none in {path} (run `spare-tl probes` first)"
        )
        return None
    out = SavedProbeStudy()
    parts: list[tuple[str, str, Callable[[Path], Any]]] = [
        ("resid", "resid/results.json", ProbeResults.load),
        ("sae", "sae/results.json", ProbeResults.load),
        ("probe", "conflict_probe/conflict_probe.safetensors", ConflictProbe.load),
        ("latents", "latents.json", _read_latents),
        ("conditional", "conditional/results.json", ConditionalResult.load),
    ]
    for name, rel, load in parts:
        file = path / rel
        if not file.is_file():
            if name != "probe":  # the deployed probe is a detail of the table
                notes.append(f"probes: no {rel} in {path}")
            continue
        try:
            setattr(out, name, load(file))
        except Exception as e:  # noqa: BLE001 - report, do not fail
            notes.append(f"probes: cannot read {file} ({first_line(e)})")
    if out.resid is None and out.sae is None and not out.latents and out.conditional is None:
        return None
    return out


def load_baselines(
    directory: str | Path, missing: list[str] | None = None
) -> dict[str, Any] | None:
    """``table.json`` of :func:`spare_tl.studies.baselines.run_table` (its ``rows`` are
    :func:`spare_tl.studies.baselines.table_rows`), else the per-method results (``<method>.json``)
    as a method → result mapping; None when there are neither."""
    path = Path(directory)
    notes = missing if missing is not None else []
    if not path.is_dir():
        notes.append(f"baselines: none in {path} (run `spare-tl baselines table` first)")
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
        notes.append(f"baselines: cannot read {path} ({first_line(e)})")
        return None
    if not results:
        notes.append(f"baselines: no table.json or <method>.json results in {path}")
        return None
    return results
