"""Floor 4, viz: plotly figures of every SpARE stage, the tables and the one-page HTML report.

Everything here takes the library's typed objects (statistics, feature sets, results JSON,
the studies' rows) and returns a ``plotly`` ``Figure`` or HTML; nothing below imports it.

- :mod:`~spare_tl.viz.figures_features`: layer-wise mutual information, MI against
  expectation, one latent's activations by behaviour;
- :mod:`~spare_tl.viz.figures_steering`: steering results, sweeps over α / K / layers,
  SpARE against the baselines;
- :mod:`~spare_tl.viz.figures_behaviour`, :mod:`~spare_tl.viz.figures_probes`,
  :mod:`~spare_tl.viz.figures_scan`: grouped prompts, conflict probes, steerability scan;
- :mod:`~spare_tl.viz.report_inputs` (reads the cache), :mod:`~spare_tl.viz.report_tables`
  and :mod:`~spare_tl.viz.report_page` (the page), :mod:`~spare_tl.cli.report`
  (``spare-tl report``), :mod:`~spare_tl.viz.browser` (headless Chromium).

The names below load on first use, so ``spare-tl --help`` does not import plotly.
"""

from __future__ import annotations

from spare_tl.lazy import lazy_getattr

# Public names -> defining module.
_EXPORTS: dict[str, str] = {
    "COLOURS": "spare_tl.viz.plotting",
    "CONDITION_NAMES": "spare_tl.viz.plotting",
    "StatisticsLike": "spare_tl.viz.plotting",
    "latent_activation_distribution": "spare_tl.viz.figures_features",
    "layerwise_mutual_information": "spare_tl.viz.figures_features",
    "layerwise_summary": "spare_tl.viz.figures_features",
    "mutual_information_scatter": "spare_tl.viz.figures_features",
    "layer_steering_effect": "spare_tl.viz.figures_steering",
    "method_comparison": "spare_tl.viz.figures_steering",
    "steering_results": "spare_tl.viz.figures_steering",
    "steering_sweep": "spare_tl.viz.figures_steering",
    "behaviour_shares": "spare_tl.viz.figures_behaviour",
    "behaviour_table": "spare_tl.viz.figures_behaviour",
    "probe_quality_by_layer": "spare_tl.viz.figures_probes",
    "steerability_scan": "spare_tl.viz.figures_scan",
    "ReportInputs": "spare_tl.viz.report_inputs",
    "load_report_inputs": "spare_tl.viz.report_inputs",
    "build_report": "spare_tl.viz.report_page",
    "classify_result": "spare_tl.viz.report_page",
    "inspect_feature": "spare_tl.viz.inspector",
    "layer_drivers": "spare_tl.viz.inspector",
    "CHROMIUM_FLAGS": "spare_tl.viz.browser",
    "find_chromium": "spare_tl.viz.browser",
    "screenshot": "spare_tl.viz.browser",
    "FeatureCard": "spare_tl.viz.feature_card",
    "feature_card": "spare_tl.viz.feature_card",
    "functional_feature_cards": "spare_tl.viz.feature_card",
    "effects_overview_html": "spare_tl.viz.feature_card",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
