"""The pipeline's stages split across ``torchrun`` ranks: grouping (the behaviours stage),
the activations stage and the development sweep.

Each runs :func:`spare_tl.distributed.run_sharded` over work units that reproduce one
process's batches exactly, so the merged stage is the one a single process writes:

- grouping: a unit is a run of ``batches_per_unit`` whole batches of one (shots, seed,
  demonstration type) setting, in the length order one process batches that setting's
  prompts in; ``records.jsonl`` and ``config.json`` are byte-identical to
  :func:`~spare_tl.stages.behaviours.group_prompts`'s (the same cache key, so either run's
  folder is reused by the other);
- activations: a unit is a run of ``batches_per_unit`` batches of the one pass over every
  kept prompt (:class:`~spare_tl.stages.activations.ActivationPass`), written as safetensors;
  ``activations.safetensors`` and ``config.json`` are byte-identical to
  :func:`~spare_tl.stages.activations.collect_activations`'s;
- the sweep: the no-steering answers are one unit and every ``settings_per_unit`` settings
  another; the merged records equal :func:`~spare_tl.stages.sweep.sweep`'s. The one-process
  sweep keeps no cache, so these records are sealed in a stage of their own
  (``records.json``; ``cache_data/<model>/sweep_records/`` from the CLI), reused when the
  same settings, features and questions run again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from spare_tl import cache, distributed
from spare_tl.data.schema import ConflictItem, items_hash
from spare_tl.features import FunctionalFeatures, sae_fingerprint
from spare_tl.generation import Decoding, _tokenize
from spare_tl.methods.base import NoSteering
from spare_tl.methods.spare import SpareMethod
from spare_tl.saes import DEFAULT_SITE, site_hook_name
from spare_tl.stages.activations import (
    ActivationPass,
    Activations,
    activations_config,
    check_layers,
    place_rows,
    stage_name,
)
from spare_tl.stages.behaviours import (
    BehaviourConfig,
    GroupedPrompts,
    answer_unit_rows,
    behaviours_config,
    behaviours_dir,
    in_unit_order,
    require_groups,
    unit_prompts,
)
from spare_tl.stages.evaluation import evaluation_questions
from spare_tl.stages.harness import Condition, answer_conditions
from spare_tl.stages.statistics import LayerStatistics
from spare_tl.stages.sweep import (
    SweepPoint,
    answer_shares,
    saes_for,
    setting_features,
    sweep_records,
)

#: the sealed stage of a split sweep's records (the one-process sweep keeps none)
SWEEP_STAGE = "sweep_records"


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def group_prompts_sharded(
    model,
    pool: Sequence[ConflictItem],
    config: BehaviourConfig | None = None,
    *,
    cache_root: Path | None = None,
    batches_per_unit: int = 4,
) -> GroupedPrompts:
    """:func:`~spare_tl.stages.behaviours.group_prompts` with its prompts split across ranks
    (units of ``batches_per_unit`` whole batches of one setting); the stage folder is the
    one a single process writes, byte for byte."""
    config = config or BehaviourConfig()
    if batches_per_unit < 1:
        raise ValueError(f"batches_per_unit must be >= 1, got {batches_per_unit}")
    full_config = behaviours_config(model, pool, config)
    directory = behaviours_dir(model.cfg.model_name, cache_root)
    rows_per_unit = config.batch_size * batches_per_unit
    units = config.units()
    parts = [(u, part) for u in range(len(units)) for part in _chunks(len(pool), rows_per_unit)]
    keys = [f"{u:04d}-{part.start:06d}" for u, part in parts]
    by_key = dict(zip(keys, parts))

    def compute(key: str) -> list[dict[str, Any]]:
        u, part = by_key[key]
        prompts, _ = unit_prompts(pool, *units[u])
        lengths = [len(t) for t in _tokenize(model, prompts)]
        order = sorted(range(len(pool)), key=lambda i: lengths[i])  # as one call sorts them
        rows = [order[i] for i in part]
        return answer_unit_rows(model, pool, units[u], rows, config)

    def merge(results: list[Any]) -> distributed.Merged:
        records = in_unit_order([r for part in results for r in part], config)
        grouped = GroupedPrompts(model.cfg.model_name, records, full_config)
        return distributed.Merged(grouped.stage_files(), {"counts": grouped.counts()})

    distributed.run_sharded(directory, full_config, keys, compute, merge)
    return GroupedPrompts.load(directory)


def collect_activations_sharded(
    model,
    grouped: GroupedPrompts,
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    min_per_group: int = 2,
    cache_root: Path | None = None,
    site: str = DEFAULT_SITE,
    batches_per_unit: int = 4,
) -> Activations:
    """:func:`~spare_tl.stages.activations.collect_activations` with its batches split
    across ranks (units of ``batches_per_unit`` batches, each unit's rows a safetensors
    file); the stage folder is the one a single process writes, byte for byte."""
    if batches_per_unit < 1:
        raise ValueError(f"batches_per_unit must be >= 1, got {batches_per_unit}")
    layers = check_layers(model, layers)
    require_groups(grouped, min_per_group)
    prompts, labels, weights = grouped.labelled()
    config = activations_config(model, grouped, layers, site)
    directory = cache.stage_dir(model.cfg.model_name, stage_name("activations", site), cache_root)
    hooks = {layer: site_hook_name(layer, site) for layer in layers}
    plan = ActivationPass.of(model, prompts, list(hooks.values()), batch_size)
    parts = _chunks(len(plan.batches), batches_per_unit)
    keys = [f"{part.start:06d}" for part in parts]
    by_key = dict(zip(keys, parts))

    def compute(key: str) -> distributed.TensorUnit:
        batches = [plan.batches[b] for b in by_key[key]]
        return distributed.TensorUnit(plan.run(model, batches), {"batches": batches})

    def merge(results: list[Any]) -> distributed.Merged:
        acts = {name: torch.cat([unit.tensors[name] for unit in results]) for name in plan.names}
        batches = [b for unit in results for b in unit.data["batches"]]
        placed = place_rows(acts, batches, len(prompts))
        resid = {layer: placed[hook] for layer, hook in hooks.items()}
        result = Activations(model.cfg.model_name, resid, labels, weights, config)
        return distributed.Merged(result.stage_files(), result.manifest())

    distributed.run_sharded(directory, config, keys, compute, merge)
    return Activations.load(directory)


def _features_digest(feature_sets: Sequence[FunctionalFeatures]) -> str:
    """A hash of the latents and mean codes every sweep point steers with."""
    digest = hashlib.sha256()
    pending = list(feature_sets)
    while pending:
        features = pending.pop(0)
        for layer in sorted(features.layers):
            found = features.layers[layer]
            digest.update(f"{layer}:{found.hook_name}:{found.latent_code};".encode())
            for t in (
                found.context_features,
                found.memory_features,
                found.context_activations,
                found.memory_activations,
            ):
                digest.update(t.detach().cpu().double().numpy().tobytes())
        strengths = (features.proportion, features.edit_strength, features.edit_strength_to_memory)
        digest.update(("{}:{}:{}|".format(*strengths)).encode())
        if features.to_memory is not None:
            pending.insert(0, features.to_memory)
    return digest.hexdigest()[:16]


def sweep_sharded(
    model,
    statistics: Mapping[int, LayerStatistics] | Mapping[str, Mapping[int, LayerStatistics]],
    saes: Mapping[Any, Any],
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    settings: Sequence[SweepPoint],
    directory: Path,
    *,
    n_shots: int = 3,
    seed: int = 0,
    demo_type: str = "doo",
    batch_size: int = 16,
    attribution: Mapping[str, Mapping[int, Any]] | None = None,
    settings_per_unit: int = 8,
) -> list[dict[str, Any]]:
    """:func:`~spare_tl.stages.sweep.sweep` with its settings split across ranks (the
    no-steering answers one unit, every ``settings_per_unit`` settings another); its
    records, sealed at ``directory`` as ``records.json``, equal one process's."""
    if not items:
        raise ValueError("the sweep needs at least one development question")
    if settings_per_unit < 1:
        raise ValueError(f"settings_per_unit must be >= 1, got {settings_per_unit}")
    feature_sets = setting_features(model, statistics, settings, attribution)
    hooks = sorted({site_hook_name(x, p.setting.site) for p in settings for x in p.setting.layers})
    used = {hook: sae for p in settings for hook, sae in saes_for(saes, p.setting).items()}
    config = {
        "stage": SWEEP_STAGE,
        "model": model.cfg.model_name,
        "dtype": str(model.cfg.dtype),
        "items": items_hash(items),
        "pool": items_hash(pool),
        "protocol": {"n_shots": n_shots, "seed": seed, "demo_type": demo_type},
        "batch_size": batch_size,
        "settings": [p.record() for p in settings],
        "features": _features_digest(feature_sets),
        "saes": {hook: sae_fingerprint(used[hook]) for hook in hooks},
    }
    questions = evaluation_questions(items, pool, n_shots, seed, demo_type)
    decoding = Decoding.of(None, {"batch_size": batch_size, "progress": False}, desc="sweep")
    parts = _chunks(len(settings), settings_per_unit)
    keys = ["none"] + [f"settings-{part.start:06d}" for part in parts]
    by_key = dict(zip(keys[1:], parts))

    def compute(key: str) -> list[dict[str, float]]:
        if key == "none":
            conditions = [Condition("none", NoSteering())]
        else:
            conditions = [
                Condition(
                    f"setting {i}",
                    SpareMethod(feature_sets[i], saes_for(saes, settings[i].setting)),
                    settings[i].direction,  # type: ignore[arg-type]
                )
                for i in by_key[key]
            ]
        answers = answer_conditions(model, questions, conditions, decoding=decoding)
        return [answer_shares(answers[c.name], questions.items) for c in conditions]

    def merge(results: list[Any]) -> dict[str, Any]:
        (none,), shares = results[0], [s for part in results[1:] for s in part]
        records = sweep_records(settings, feature_sets, none, shares, len(items))
        return {"records.json": lambda p: cache.write_json(p, records)}

    distributed.run_sharded(directory, config, keys, compute, merge)
    cache.verify_stage(directory)
    return cache.read_json(Path(directory) / "records.json")
