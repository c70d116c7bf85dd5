"""Stage 4, functional features (``spare-tl features``): the selection at proportion K per
direction, by mutual information, attribution or both (the rule: :mod:`spare_tl.features`),
from the saved statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from spare_tl.features import (
    DirectionSetting,
    FunctionalFeatures,
    LayerFeatures,
    select_features,
)
from spare_tl.stages.statistics import LayerStatistics, statistics_at

if TYPE_CHECKING:
    from spare_tl.stages.attribution import LayerAttribution


def functional_features(
    statistics: Mapping[int, LayerStatistics],
    setting: DirectionSetting,
    *,
    model_name: str,
    direction: str | None = None,
    metadata: dict[str, Any] | None = None,
    attribution: Mapping[int, LayerAttribution] | None = None,
) -> FunctionalFeatures:
    """The features stage: select context/memory features per layer of ``setting`` (all of
    ``statistics``' layers when it names none) at its proportion K, by its selection
    (``"mi"``, ``"attribution"`` or ``"both"``, :data:`spare_tl.features.SELECTIONS`); the
    last two rank by ``attribution`` toward ``direction`` and give a set for that direction
    only. The set steers with the setting's α; the selection is recorded in its metadata."""
    selection = setting.selection
    if selection != "mi" and direction not in ("context", "memory"):
        raise ValueError(
            f"selection {selection!r} chooses features for one direction: pass "
            f"direction='context' or 'memory', got {direction!r}"
        )
    chosen = list(setting.layers) if setting.layers else sorted(statistics)
    missing = [layer for layer in chosen if layer not in statistics]
    if missing:
        raise ValueError(f"no statistics for layer(s) {missing}; have {sorted(statistics)}")
    codes = {statistics[layer].latent_code for layer in chosen}
    if codes - {setting.latent_code}:
        raise ValueError(
            f"the setting asks for the {setting.latent_code!r} code but the statistics of "
            f"layers {chosen} hold {sorted(codes)}; set latent_code to match and rerun "
            "`spare-tl statistics`"
        )
    per_layer = {}
    for layer in chosen:
        s = statistics[layer]
        attr = None
        if selection != "mi":
            attr = _attribution_of(attribution, s, layer).toward(direction)  # type: ignore[arg-type]
        ctx, mem = select_features(
            selection, setting.proportion, s.mutual_information, s.expectation, attr
        )
        per_layer[layer] = LayerFeatures(
            layer=layer,
            hook_name=s.hook_name,
            sae_id=s.sae_id,
            context_features=ctx,
            memory_features=mem,
            context_activations=s.context_activations,
            memory_activations=s.memory_activations,
            latent_code=s.latent_code,
            sae_fingerprint=s.sae_fingerprint,
        )
    return FunctionalFeatures(
        model_name=model_name,
        layers=per_layer,
        proportion=setting.proportion,
        edit_strength=setting.edit_strength,
        metadata={**(metadata or {}), "selection": selection},
    )


def _attribution_of(
    attribution: Mapping[int, LayerAttribution] | None, stats: LayerStatistics, layer: int
) -> LayerAttribution:
    """Layer ``layer``'s attribution, checked to come from the statistics' SAE and code."""
    if not attribution or layer not in attribution:
        raise ValueError(
            f"no attribution for layer {layer}: run the attribution stage "
            "(`spare-tl attribution CONFIG`) for it first"
        )
    a = attribution[layer]
    if (a.sae_fingerprint, a.latent_code) != (stats.sae_fingerprint, stats.latent_code):
        raise ValueError(
            f"layer {layer}: the attribution was computed with another SAE or latent code "
            f"than the statistics ({a.sae_fingerprint}/{a.latent_code} vs "
            f"{stats.sae_fingerprint}/{stats.latent_code}); rerun `spare-tl attribution`"
        )
    return a


def directional_features(
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    *,
    model_name: str,
    context: DirectionSetting,
    memory: DirectionSetting,
    metadata: dict[str, Any] | None = None,
    attribution: Mapping[str, Mapping[int, LayerAttribution]] | None = None,
) -> FunctionalFeatures:
    """The feature set steering to context with ``context`` and to memory with ``memory``
    (``statistics`` per layer, or by site then layer; ``attribution`` by site then layer,
    needed for a selection other than ``"mi"``).

    When both pick the same features (:meth:`DirectionSetting.same_features`), one set with
    an α per direction; otherwise the context set carries a separate
    :attr:`~FunctionalFeatures.to_memory` set.
    """

    def feature_set(setting: DirectionSetting, direction: str) -> FunctionalFeatures:
        return functional_features(
            statistics_at(statistics, setting.site),
            setting,
            model_name=model_name,
            direction=direction,
            metadata=metadata,
            attribution=(attribution or {}).get(setting.site),
        )

    if context.same_features(memory):
        alpha_mem = memory.edit_strength
        alpha_mem = None if alpha_mem == context.edit_strength else alpha_mem
        return replace(feature_set(context, "context"), edit_strength_to_memory=alpha_mem)
    return replace(feature_set(context, "context"), to_memory=feature_set(memory, "memory"))
