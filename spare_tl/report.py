"""Deprecated location of the HTML report: import it from :mod:`spare_tl.viz`.

The report moved to :mod:`spare_tl.viz` (``report_inputs`` reads the cache, ``report_page``
builds the page from ``report_tables``, ``browser`` drives headless Chromium;
``spare-tl report`` is :mod:`spare_tl.cli.report`); the saved probe study is read by
:func:`spare_tl.studies.saved.load_probe_study`. This module re-exports the same objects so
that existing scripts keep working; it emits a DeprecationWarning and will be removed in the
next release.
"""

from __future__ import annotations

import warnings

from spare_tl.cli.report import register
from spare_tl.studies.saved import SavedProbeStudy, load_baselines, load_probe_study
from spare_tl.viz.browser import CHROMIUM_FLAGS, find_chromium, screenshot
from spare_tl.viz.plotting import CONDITION_NAMES
from spare_tl.viz.report_inputs import DEFAULT_MODEL, ReportInputs, load_report_inputs
from spare_tl.viz.report_page import DEFAULT_PROPORTION, build_report, classify_result

warnings.warn(
    "spare_tl.report moved to spare_tl.viz; the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)

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

# The loaders' old private names (spare_tl.cli.docs imported ``_load_probes``).
_load_probes = load_probe_study
_load_baselines = load_baselines
