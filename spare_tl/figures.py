"""Deprecated location of the figures: import them from :mod:`spare_tl.viz`.

The figures moved to :mod:`spare_tl.viz` (``figures_features``, ``figures_steering``,
``figures_behaviour``, ``figures_probes``, ``figures_scan``, sharing ``plotting``). This
module re-exports the same objects so that existing notebooks and scripts keep working; it
emits a DeprecationWarning and will be removed in the next release.
"""

from __future__ import annotations

import warnings

from spare_tl.viz.figures_behaviour import (
    DEMO_TYPE_NAMES,
    DEMO_TYPE_ORDER,
    behaviour_shares,
    behaviour_table,
)
from spare_tl.viz.figures_features import (
    latent_activation_distribution,
    layerwise_mutual_information,
    layerwise_summary,
    mutual_information_scatter,
)
from spare_tl.viz.figures_probes import PROBE_COLOURS, PROBE_INPUT_NAMES, probe_quality_by_layer
from spare_tl.viz.figures_scan import SITE_DASH, SITE_NAMES, steerability_scan
from spare_tl.viz.figures_steering import (
    layer_steering_effect,
    method_comparison,
    steering_results,
    steering_sweep,
)
from spare_tl.viz.plotting import (
    AXIS_NAMES,
    COLOURS,
    CONDITION_NAMES,
    TEMPLATE,
    StatisticsLike,
)

warnings.warn(
    "spare_tl.figures moved to spare_tl.viz; the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "AXIS_NAMES",
    "COLOURS",
    "CONDITION_NAMES",
    "DEMO_TYPE_NAMES",
    "DEMO_TYPE_ORDER",
    "PROBE_COLOURS",
    "PROBE_INPUT_NAMES",
    "SITE_DASH",
    "SITE_NAMES",
    "TEMPLATE",
    "StatisticsLike",
    "behaviour_shares",
    "behaviour_table",
    "latent_activation_distribution",
    "layer_steering_effect",
    "layerwise_mutual_information",
    "layerwise_summary",
    "method_comparison",
    "mutual_information_scatter",
    "probe_quality_by_layer",
    "steerability_scan",
    "steering_results",
    "steering_sweep",
]
