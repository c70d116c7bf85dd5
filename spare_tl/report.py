"""Deprecated location of the HTML report: import it from :mod:`spare_tl.viz`.

The report moved to :mod:`spare_tl.viz` (``report_inputs`` reads the cache, ``report_page``
builds the page from ``report_tables``, ``report_cli`` is ``spare-tl report``, ``browser``
drives headless Chromium); the saved probe study is read by
:func:`spare_tl.saved_studies.load_probe_study`. This module re-exports the same objects so
that existing scripts keep working; it emits no warning, and it will be removed in a later
release.
"""

from __future__ import annotations

from spare_tl.saved_studies import SavedProbeStudy, load_baselines, load_probe_study
from spare_tl.viz.browser import CHROMIUM_FLAGS, find_chromium, screenshot
from spare_tl.viz.plotting import CONDITION_NAMES
from spare_tl.viz.report_cli import register
from spare_tl.viz.report_inputs import DEFAULT_MODEL, ReportInputs, load_report_inputs
from spare_tl.viz.report_page import DEFAULT_PROPORTION, build_report, classify_result

__all__ = [
    "CHROMIUM_FLAGS",
    "CONDITION_NAMES",
    "DEFAULT_MODEL",
    "DEFAULT_PROPORTION",
    "ReportInputs",
    "SavedProbeStudy",
    "build_report",
    "classify_result",
    "find_chromium",
    "load_report_inputs",
    "register",
    "screenshot",
]

# The loaders' old private names (spare_tl.results_doc imported ``_load_probes``).
_load_probes = load_probe_study
_load_baselines = load_baselines
