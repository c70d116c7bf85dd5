"""Choose the edit site, layer window, proportion K and edit strength α per direction on
development questions only.

The development questions are held-out memorised questions disjoint from the test ones
(:func:`spare_tl.stages.evaluation.development_items`: the tail of the held-out list, relations
interleaved), asked with exactly the test protocol (demonstrations from the pool,
:func:`spare_tl.stages.evaluation.evaluation_demonstrations`). Every setting is one condition of the
shared-prefix harness, so a grid over every window of 2-6 consecutive layers at each SAE site
costs one prompt pass per batch plus the last token and the decoding per setting. The best
setting per direction is the highest EM in that direction among those that break at most
``max_neither_rise`` points more answers than no steering (ties: fewer broken answers). The
sweep is saved as JSON, with the steerability scan's oracle at the chosen layers when a scan
of the same questions is cached.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

from spare_tl import cache
from spare_tl.data.prompts import Questions
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.features import DirectionSetting, FunctionalFeatures
from spare_tl.generation import Decoding, DecodingOptions
from spare_tl.layer_spec import parse_layers
from spare_tl.methods.base import NoSteering, SteeringMethod
from spare_tl.methods.spare import SpareMethod
from spare_tl.saes import DEFAULT_SITE, check_site, site_hook_name
from spare_tl.stages.evaluation import evaluation_questions
from spare_tl.stages.harness import Condition, answer_conditions
from spare_tl.stages.selection import directional_features, functional_features
from spare_tl.stages.statistics import LayerStatistics, statistics_at

logger = logging.getLogger(__name__)

TARGET = {"context": "EM_C", "memory": "EM_M"}
#: the default cap on broken answers for a chosen setting (points over no steering)
MAX_NEITHER_RISE = 10.0
#: below this gain (points) the scan's donor patch is no ceiling and no share is given
MIN_ORACLE_GAIN = 5.0


def answer_shares(answers: Sequence[str], items: Sequence[ConflictItem]) -> dict[str, float]:
    """EM_C, EM_M and neither (%) of greedy answers to ``items``."""
    labels = [behaviour_label(a, it) for a, it in zip(answers, items)]
    n = max(len(labels), 1)
    return {
        "EM_C": 100.0 * labels.count("context") / n,
        "EM_M": 100.0 * labels.count("memory") / n,
        "neither": 100.0 * labels.count("neither") / n,
    }


def answer_settings(
    model,
    questions: Questions,
    steered: Sequence[tuple[SteeringMethod, str]],
    *,
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> list[dict[str, float]]:
    """:func:`answer_shares` of the development ``questions`` without steering, then of every
    ``(method, direction)``: each one a condition of the one harness
    (:func:`spare_tl.stages.harness.answer_conditions`)."""
    if not len(questions):
        raise ValueError("the sweep needs at least one development question")
    conditions = [Condition("none", NoSteering())] + [
        Condition(f"setting {i}", method, direction)  # type: ignore[arg-type]
        for i, (method, direction) in enumerate(steered)
    ]
    dec = Decoding.of(decoding, options, desc="sweep")
    answers = answer_conditions(model, questions, conditions, decoding=dec)
    return [answer_shares(answers[c.name], questions.items) for c in conditions]


@dataclass(frozen=True)
class SweepPoint:
    """One point of the sweep: steer to ``direction`` with ``setting`` (site, layers, K, α,
    selection)."""

    direction: str
    setting: DirectionSetting

    def __post_init__(self) -> None:
        if self.direction not in TARGET:
            raise ValueError(f"direction must be 'context' or 'memory', got {self.direction!r}")
        if not self.setting.layers:
            raise ValueError("a sweep point needs at least one layer")

    def record(self) -> dict[str, Any]:
        """The point as the sweep's JSON records it (direction, then the setting's fields)."""
        return {"direction": self.direction, **self.setting.record()}


def windows(
    layers: Sequence[int], sizes: Sequence[int] = (2, 3, 4, 5, 6), stride: int = 1
) -> list[tuple[int, ...]]:
    """Every run of ``size`` consecutive layers inside ``layers`` (for each size), starting
    every ``stride`` layers."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    have = sorted(set(int(x) for x in layers))
    out: list[tuple[int, ...]] = []
    for size in sizes:
        if size < 1:
            raise ValueError(f"window sizes must be >= 1, got {size}")
        for start in have[::stride]:
            window = tuple(range(start, start + size))
            if set(window) <= set(have):
                out.append(window)
    return out


def grid(
    layer_sets: Mapping[str, Sequence[Sequence[int]]],
    proportions: Sequence[float],
    strengths: Sequence[float],
    directions: Sequence[str] = ("context", "memory"),
    selections: Sequence[str] = ("mi",),
    latent_code: str = "encode",
) -> list[SweepPoint]:
    """Every (site, layers) of ``layer_sets`` (site → layer sets) × K × α × direction ×
    selection, on the statistics' ``latent_code``."""
    return [
        SweepPoint(d, DirectionSetting(site, tuple(ls), float(k), float(a), sel, latent_code))
        for site, sets in layer_sets.items()
        for ls in sets
        for k in proportions
        for a in strengths
        for d in directions
        for sel in selections
    ]


def sweep(
    model,
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    saes: Mapping[Any, Any],
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    settings: Sequence[SweepPoint],
    *,
    n_shots: int = 3,
    seed: int = 0,
    demo_type: str = "doo",
    batch_size: int = 16,
    progress: bool = True,
    attribution: Mapping[str, Mapping[int, Any]] | None = None,
) -> list[dict[str, Any]]:
    """EM per setting on the development ``items`` (demonstrations from ``pool`` as in the
    test protocol); first record: no steering.

    ``statistics``: per layer (the residual's) or by site then layer; ``saes``: keyed by hook
    name (any site) or by layer (residual); ``attribution`` (by site, then layer) for the
    settings that select by it. Every setting is a condition of the one harness
    (:func:`spare_tl.stages.harness.answer_conditions`)."""
    if not items:
        raise ValueError("the sweep needs at least one development question")
    feature_sets = setting_features(model, statistics, settings, attribution)
    steered = [
        (SpareMethod(features, saes_for(saes, point.setting)), point.direction)
        for point, features in zip(settings, feature_sets)
    ]
    questions = evaluation_questions(items, pool, n_shots, seed, demo_type)
    none, *shares = answer_settings(
        model, questions, steered, batch_size=batch_size, progress=progress
    )
    return sweep_records(settings, feature_sets, none, shares, len(items))


def setting_features(
    model,
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    settings: Sequence[SweepPoint],
    attribution: Mapping[str, Mapping[int, Any]] | None = None,
) -> list[FunctionalFeatures]:
    """The feature set each sweep point steers with."""
    return [
        functional_features(
            statistics_at(statistics, point.setting.site),
            point.setting,
            model_name=model.cfg.model_name,
            direction=point.direction,
            attribution=(attribution or {}).get(point.setting.site),
        )
        for point in settings
    ]


def sweep_records(
    settings: Sequence[SweepPoint],
    feature_sets: Sequence[FunctionalFeatures],
    none: Mapping[str, float],
    shares: Sequence[Mapping[str, float]],
    n: int,
) -> list[dict[str, Any]]:
    """The sweep's records: no steering first, then each point with its answer shares."""
    records: list[dict[str, Any]] = [
        {
            "direction": "none",
            "site": "",
            "layers": [],
            "proportion": 0.0,
            "edit_strength": 0.0,
            "n": n,
            **none,
        }
    ]
    for point, features, share in zip(settings, feature_sets, shares):
        rec = {
            **point.record(),
            "n": n,
            "n_features": sum(c + m for c, m in features.counts().values()),
            **share,
        }
        logger.info("sweep %s", rec)
        records.append(rec)
    return records


def saes_for(saes: Mapping[Any, Any], setting: DirectionSetting) -> dict[str, Any]:
    out = {}
    for layer in setting.layers:
        hook = site_hook_name(layer, setting.site)
        if hook in saes:
            out[hook] = saes[hook]
        elif setting.site == DEFAULT_SITE and layer in saes:
            out[hook] = saes[layer]
        else:
            raise ValueError(f"no SAE for {hook}; the sweep's SAEs: {sorted(map(str, saes))}")
    return out


def best_settings(
    records: Sequence[dict[str, Any]], max_neither_rise: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per direction, the record with the highest EM in that direction (then fewest broken)
    among those whose "neither" share is at most ``max_neither_rise`` points above no
    steering's (all records when none qualifies or the cap is None)."""
    none = next((r for r in records if r["direction"] == "none"), None)
    out = {}
    for direction, key in TARGET.items():
        cands = [r for r in records if r["direction"] == direction]
        if max_neither_rise is not None and none is not None:
            kept = [r for r in cands if r["neither"] <= none["neither"] + max_neither_rise]
            cands = kept or cands
        if cands:
            out[direction] = max(cands, key=lambda r: (r[key], -r["neither"]))
    return out


def oracle_shares(
    records: Sequence[dict[str, Any]], best: Mapping[str, Mapping[str, Any]], scan: Any
) -> dict[str, dict[str, float | None]]:
    """Per chosen setting: the scan's oracle (best single-layer donor patch) at the same site
    and layers, and the share of the oracle's gain over no steering that the setting reaches.
    ``share`` is None when the oracle gains less than :data:`MIN_ORACLE_GAIN` points there
    (its donor is then no ceiling to measure against)."""
    none = next(r for r in records if r["direction"] == "none")
    out: dict[str, dict[str, float | None]] = {}
    for direction, rec in best.items():
        key = TARGET[direction]
        site = rec.get("site") or DEFAULT_SITE
        try:
            oracle = scan.oracle(direction, rec["layers"], site)
        except ValueError:
            continue
        oracle_gain = oracle - scan.baseline[key]
        gain = rec[key] - none[key]
        out[direction] = {
            "oracle_EM": oracle,
            "oracle_gain": oracle_gain,
            "spare_gain": gain,
            "share": gain / oracle_gain if oracle_gain >= MIN_ORACLE_GAIN else None,
        }
    return out


def features_from_sweep(
    records: Sequence[dict[str, Any]],
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    model_name: str,
    *,
    metadata: dict[str, Any] | None = None,
    max_neither_rise: float | None = None,
    attribution: Mapping[str, Mapping[int, Any]] | None = None,
    latent_code: str = "encode",
) -> FunctionalFeatures:
    """The feature set of the sweep's best setting per direction (each at its own site, layers,
    K, α and selection, on the statistics' ``latent_code``), exactly the setting measured on
    the development set (:func:`~spare_tl.stages.selection.directional_features`;
    ``attribution`` by site, then layer, when a chosen setting selects by it)."""
    best = best_settings(records, max_neither_rise)
    if "context" not in best or "memory" not in best:
        raise ValueError("the sweep has no steered records for both directions")
    return directional_features(
        statistics,
        model_name=model_name,
        context=setting_of(best["context"], latent_code),
        memory=setting_of(best["memory"], latent_code),
        metadata=metadata,
        attribution=attribution,
    )


def setting_of(record: Mapping[str, Any], latent_code: str = "encode") -> DirectionSetting:
    """The :class:`DirectionSetting` a sweep record measured (records before selections
    were swept select by MI)."""
    return DirectionSetting(
        site=record.get("site") or DEFAULT_SITE,
        layers=tuple(record["layers"]),
        proportion=record["proportion"],
        edit_strength=record["edit_strength"],
        selection=record.get("selection", "mi"),
        latent_code=latent_code,
    )


def save_sweep(
    records: Sequence[dict[str, Any]],
    directory: Path,
    config: dict[str, Any],
    oracle: Mapping[str, Any] | None = None,
) -> None:
    """Write ``sweep.json``: the config, every record, the best per direction (with the
    config's ``max_neither_rise``) and, when given, the oracle shares."""
    best = best_settings(records, config.get("max_neither_rise"))
    data: dict[str, Any] = {"config": config, "records": list(records), "best": best}
    if oracle is not None:
        data["oracle"] = dict(oracle)
    cache.write_json(Path(directory) / "sweep.json", data)


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (committed metadata)."""
    try:
        return str(Path(path).resolve().relative_to(cache.REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


def parse_layer_set(spec: str) -> tuple[str, list[int]]:
    """``"19-22"`` (the residual) or ``"attn_out:20-23"`` → (site, layers)."""
    site, _, layers = spec.rpartition(":")
    return check_site(site or DEFAULT_SITE), parse_layers([layers])


def combine_sweeps(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Join sweep.json files of parts of one grid: one no-steering record (they must agree:
    same dev set), every steered record once; the grid lists and seconds are merged."""
    if not paths:
        raise ValueError("nothing to combine: pass sweep.json files")
    parts = [cache.read_json(p) for p in paths]
    base = parts[0]["records"][0]
    for path, part in zip(paths, parts):
        first = part["records"][0]
        if first["direction"] != "none" or first != base:
            raise ValueError(
                f"{path}: its no-steering record differs from {paths[0]}'s; the parts were "
                "not run on the same dev set and model"
            )
    records = [base]
    seen = set()
    for part in parts:
        for rec in part["records"][1:]:
            key = (
                rec["direction"],
                rec.get("site") or DEFAULT_SITE,
                tuple(rec["layers"]),
                rec["proportion"],
                rec["edit_strength"],
                rec.get("selection", "mi"),
            )
            if key not in seen:
                seen.add(key)
                records.append(rec)
    dtypes = {str(part["config"].get("dtype")) for part in parts}
    if len(dtypes) > 1:
        raise ValueError(f"the parts ran the model in different dtypes {sorted(dtypes)}")
    config = dict(parts[0]["config"])
    for key in ("layer_sets", "proportions", "strengths", "selections"):
        if not any(key in part["config"] for part in parts):
            continue
        merged: list[Any] = []
        for part in parts:
            for value in part["config"].get(key, []):
                if value not in merged:
                    merged.append(value)
        config[key] = merged
    config["seconds"] = sum(part["config"].get("seconds", 0) for part in parts)
    config["combined_from"] = [display_path(p) for p in paths]
    return records, config
