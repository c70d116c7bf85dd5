"""The causal effect of each functional feature on the answers.

For each steering direction and each feature of that direction's set, two edits on
development questions, both with the full edit's α and its rule for that feature (a context
feature is added when steering to context and removed when steering to memory; a memory
feature the other way round):

- **only**: the SpARE edit restricted to that one feature;
- **without**: the full set's edit with that one feature left out.

Every condition (no steering, the full set, and the two per feature, both directions)
answers through the one harness (:func:`spare_tl.stages.harness.answer_conditions`): one
shared prompt pass per batch. The table per direction is sorted by the single feature's gain
in the target share (EM_C steering to context, EM_M to memory) over no steering: which
features carry the steering, which do nothing, which break answers (neither). A second
short pass measures the edit restricted to each direction's top 3 features together, so the
share of the full set's gain they reach is measured, not summed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spare_tl import cache
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.embedded import EMBEDDED_MODEL, SHIPPED_ROOT
from spare_tl.features import FunctionalFeatures
from spare_tl.methods.base import NoSteering
from spare_tl.methods.spare import DIRECTIONS, SpareMethod
from spare_tl.stages.evaluation import EvaluationConfig, check_held_out, evaluation_questions
from spare_tl.stages.harness import Condition, answer_conditions

STAGE = "feature_effects"
TARGET = {"context": "EM_C", "memory": "EM_M"}
TOP = 3


@dataclass(frozen=True)
class Feature:
    """One functional feature: where it is, which latent, and which set it belongs to."""

    layer: int
    hook_name: str
    latent: int
    role: str  # "context" or "memory" feature

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.latent}"


def direction_features(features: FunctionalFeatures, direction: str) -> list[Feature]:
    """Every feature the edit to ``direction`` touches (context and memory features)."""
    fset = features.for_direction(direction)
    return [
        Feature(layer, f.hook_name, int(latent), role)
        for layer, f in sorted(fset.layers.items())
        for role, ids in (("context", f.context_features), ("memory", f.memory_features))
        for latent in ids.tolist()
    ]


def restricted(
    features: FunctionalFeatures, direction: str, keep: Sequence[Feature]
) -> FunctionalFeatures:
    """The ``direction`` edit restricted to the features ``keep`` (same α, same rule)."""
    fset = features.for_direction(direction)
    wanted = {(f.layer, f.latent, f.role) for f in keep}
    layers = {}
    for layer, f in fset.layers.items():
        ids = {
            role: torch.tensor(
                [i for i in getattr(f, f"{role}_features").tolist() if (layer, i, role) in wanted],
                dtype=torch.long,
            )
            for role in ("context", "memory")
        }
        if ids["context"].numel() or ids["memory"].numel():
            layers[layer] = dataclasses.replace(
                f, context_features=ids["context"], memory_features=ids["memory"]
            )
    return FunctionalFeatures(
        model_name=fset.model_name,
        layers=layers,
        proportion=fset.proportion,
        edit_strength=features.strength(direction),
    )


def _shares(labels: Sequence[str]) -> dict[str, float]:
    n = max(len(labels), 1)
    return {
        "EM_C": 100.0 * sum(x == "context" for x in labels) / n,
        "EM_M": 100.0 * sum(x == "memory" for x in labels) / n,
        "neither": 100.0 * sum(x == "neither" for x in labels) / n,
    }


@dataclass
class FeatureEffects:
    """Per direction: no steering, the full set, the top 3 and one row per feature."""

    model_name: str
    n_items: int
    seeds: list[int]
    directions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureEffects:
        return cls(**dict(data))

    def table(self, direction: str) -> list[dict[str, Any]]:
        """The feature rows of ``direction``, largest gain first."""
        return list(self.directions[direction]["features"])

    def of(self, layer: int, latent: int) -> dict[str, dict[str, Any]]:
        """The rows of the feature at ``layer``:``latent``, by direction."""
        return {
            d: row
            for d, block in self.directions.items()
            for row in block["features"]
            if row["layer"] == layer and row["latent"] == latent
        }


def _labels(
    model,
    conditions: Sequence[Condition],
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    seed: int,
    config: EvaluationConfig,
    progress: bool,
) -> dict[str, list[str]]:
    questions = evaluation_questions(
        items, pool, config.n_shots, seed, config.demo_type, config.demonstrations
    )
    answers = answer_conditions(
        model, questions, conditions, decoding=config.decoding(progress, f"feature effects {seed}")
    )
    return {c: [behaviour_label(a, it) for a, it in zip(ans, items)] for c, ans in answers.items()}


def _cached_labels(
    directory: Path | None, name: str, key: str, compute: Any
) -> dict[str, list[str]]:
    """Labels from ``directory/name`` when saved with ``key``; else computed and saved."""
    path = directory / name if directory is not None else None
    if path is not None and path.is_file():
        saved = cache.read_json(path)
        if saved.get("fingerprint") == key:
            return saved["labels"]
    labels = compute()
    if path is not None:
        cache.write_json(path, {"fingerprint": key, "labels": labels})
    return labels


def feature_effects(
    model,
    features: FunctionalFeatures,
    saes: Mapping[Any, Any],
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    config: EvaluationConfig | None = None,
    directory: str | Path | None = None,
    progress: bool = True,
) -> FeatureEffects:
    """Measure every feature's causal effect on ``items`` (development questions) with
    demonstrations from ``pool``, per seed of ``config``. Cached in ``directory`` (per seed,
    resumable), with the config beside it."""
    config = config or EvaluationConfig(seeds=(0,))
    check_held_out(items, pool)
    per_direction = {d: direction_features(features, d) for d in DIRECTIONS}
    stage_config = {
        "stage": STAGE,
        "model": model.cfg.model_name,
        "questions": cache.fingerprint({"q": [it.question for it in items]}),
        "pool": cache.fingerprint({"q": [it.question for it in pool]}),
        "n_items": len(items),
        "features": {
            d: {"alpha": features.strength(d), "features": [f.key for f in fs]}
            for d, fs in per_direction.items()
        },
        "evaluation": dataclasses.asdict(config),
    }
    key = cache.fingerprint(stage_config)
    if directory is not None:
        directory = Path(directory)
        if cache.is_fresh(directory, stage_config):
            return FeatureEffects.from_json(cache.read_json(directory / "effects.json"))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / cache.CONFIG).unlink(missing_ok=True)
    conditions = [Condition("no_steering", NoSteering())]
    for d, fs in per_direction.items():
        conditions.append(Condition(f"{d}:full", SpareMethod(features, saes), d))
        for f in fs:
            rest = [g for g in fs if g != f]
            for kind, keep in (("only", [f]), ("without", rest)):
                method = SpareMethod(restricted(features, d, keep), saes)
                conditions.append(Condition(f"{d}:{kind}:{f.key}", method, d))
    labels = {
        seed: _cached_labels(
            directory,
            f"seed{seed}.json",
            key,
            lambda seed=seed: _labels(model, conditions, items, pool, seed, config, progress),
        )
        for seed in config.seeds
    }
    shares = {c.name: _mean([_shares(labels[s][c.name]) for s in config.seeds]) for c in conditions}
    result = FeatureEffects(model.cfg.model_name, len(items), list(config.seeds))
    tops: dict[str, list[Feature]] = {}
    for d, fs in per_direction.items():
        target = TARGET[d]
        base, full = shares["no_steering"], shares[f"{d}:full"]
        rows = []
        for f in fs:
            only, without = shares[f"{d}:only:{f.key}"], shares[f"{d}:without:{f.key}"]
            rows.append(
                {
                    "layer": f.layer,
                    "hook_name": f.hook_name,
                    "latent": f.latent,
                    "role": f.role,
                    "edit": "added" if f.role == d else "removed",
                    "only": only,
                    "without": without,
                    "gain": only[target] - base[target],
                    "loss_without": full[target] - without[target],
                    "neither_added": only["neither"] - base["neither"],
                }
            )
        rows.sort(key=lambda r: (-r["gain"], -r["loss_without"], r["layer"], r["latent"]))
        tops[d] = [next(f for f in fs if f.key == f"{r['layer']}:{r['latent']}") for r in rows]
        tops[d] = tops[d][:TOP]
        result.directions[d] = {
            "target": target,
            "edit_strength": features.strength(d),
            "no_steering": base,
            "full": full,
            "features": rows,
        }
    top_conditions = [
        Condition(f"{d}:top", SpareMethod(restricted(features, d, tops[d]), saes), d)
        for d in DIRECTIONS
    ]
    top_key = cache.fingerprint({"stage": key, "top": {d: [f.key for f in tops[d]] for d in tops}})
    for d in DIRECTIONS:
        block = result.directions[d]
        block["top"] = [f.key for f in tops[d]]
    top_labels = {
        seed: _cached_labels(
            directory,
            f"top_seed{seed}.json",
            top_key,
            lambda seed=seed: _labels(model, top_conditions, items, pool, seed, config, progress),
        )
        for seed in config.seeds
    }
    for d in DIRECTIONS:
        block = result.directions[d]
        top = _mean([_shares(top_labels[s][f"{d}:top"]) for s in config.seeds])
        target = block["target"]
        full_gain = block["full"][target] - block["no_steering"][target]
        block["top_shares"] = top
        block["top_share_of_full_gain"] = (
            (top[target] - block["no_steering"][target]) / full_gain if full_gain > 0 else None
        )
    if directory is not None:
        cache.write_json(directory / "effects.json", result.to_json())
        cache.mark_complete(directory, stage_config, files=["effects.json"])
    return result


def _mean(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def read_feature_effects(directory: str | Path) -> FeatureEffects:
    """A saved causal-effect stage folder, checked against its manifest."""
    directory = Path(directory)
    cache.verify_stage(directory)
    return FeatureEffects.from_json(cache.read_json(directory / "effects.json"))


def load_feature_effects(
    model_name: str = EMBEDDED_MODEL, *, root: str | Path | None = None
) -> FeatureEffects:
    """The saved causal effect of each functional feature of ``model_name`` (the shipped one
    for the embedded model when the writable cache has none)."""
    roots = [Path(root)] if root is not None else [cache.default_cache_root(), SHIPPED_ROOT]
    for base in roots:
        directory = cache.stage_dir(model_name, STAGE, base)
        if (directory / cache.CONFIG).is_file():
            return read_feature_effects(directory)
    raise FileNotFoundError(
        f"no causal effects for {model_name!r} under {', '.join(map(str, roots))}; run "
        "`spare-tl features effects` first"
    )
