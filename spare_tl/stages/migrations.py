"""Bring a cache folder written before manifests and content identities up to date.

Stages written by earlier spare-tl versions have a ``config.json`` without a file manifest,
a memorised set named only by its dataset's name, grouped prompts keyed by the pool's
questions only, statistics keyed by a weak SAE hash, and feature sets that do not record
their SAEs' fingerprints. :func:`upgrade_model_cache` upgrades such a folder **in place,
without touching a data file** (safetensors and JSONL stay byte-identical):

- each stage is first checked against what its old config recorded (the questions hash of
  the memorised set, the pool hash of the grouped prompts, the old SAE hash of each layer's
  statistics, the SAE folder a feature set names), and refused if anything differs;
- the config gains the new identity (``items_hash``, ``pool_items_hash``,
  ``sae_fingerprint``) and the manifest of the files as they are
  (:func:`spare_tl.cache.seal_stage`); the memorised folder is renamed to its content key
  (:func:`spare_tl.stages.memorised.dataset_key`).

Only for a folder known to be good (the committed ``cache_data/smollm2-135m-instruct`` was
upgraded this way, with its tests passing before and after)::

    spare-tl upgrade-cache cache_data/smollm2-135m-instruct

For any other stage written before manifests, ``spare-tl cache seal DIR`` adds the manifest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.data.schema import ConflictItem, items_hash
from spare_tl.errors import CacheError
from spare_tl.features import FEATURES_JSON, FEATURES_TENSORS, TO_MEMORY_DIR, sae_fingerprint

logger = logging.getLogger(__name__)

#: the behaviours stage's folder, and its name before (spare_tl.stages.behaviours: STAGE,
#: LEGACY_STAGE; spelled here because that module imports this one)
BEHAVIOURS = "behaviours"
LEGACY_STAGE = "grouped_prompts"


def _needs(directory: Path, key: str) -> dict[str, Any] | None:
    """The stored config.json when the stage lacks ``key`` or a manifest, else None."""
    stored = cache.read_stage_config(directory)
    if stored is None or not stored.get("complete", False):
        raise CacheError(f"{directory} is not a completed stage; it cannot be upgraded")
    if key in stored["config"] and cache.MANIFEST in stored:
        return None
    return stored


def upgrade_memorised(directory: Path, items: list[ConflictItem]) -> Path:
    """Rename a legacy ``memorised/<name>`` folder to its content key and seal it."""
    from spare_tl.stages.memorised import dataset_key

    directory = Path(directory)
    stored = _needs(directory, "items_hash")
    if stored is None:
        return directory
    config = stored["config"]
    if config["questions_hash"] != cache.fingerprint({"q": [it.question for it in items]}):
        raise CacheError(f"{directory}: its questions are not those of the given dataset")
    preds = cache.read_jsonl(directory / "predictions.jsonl")
    if [p["question"] for p in preds] != [it.question for it in items]:
        raise CacheError(f"{directory}: predictions.jsonl does not follow the dataset's items")
    config = {**config, "items_hash": items_hash(items)}
    target = directory.parent / dataset_key(config["dataset"], config["items_hash"])
    if target != directory:
        if target.exists():
            raise CacheError(f"{target} exists already; remove one of the two folders")
        os.rename(directory, target)
    cache.seal_stage(target, config=config)
    return target


def upgrade_grouped(directory: Path, pool: list[ConflictItem]) -> None:
    """Add the pool's content hash to the grouped prompts' config and seal them."""
    stored = _needs(directory, "pool_items_hash")
    if stored is None:
        return
    config = stored["config"]
    if config["pool_hash"] != cache.fingerprint({"q": [it.question for it in pool]}):
        raise CacheError(f"{directory}: its pool is not the given pool")
    cache.seal_stage(directory, config={**config, "pool_items_hash": items_hash(pool)})


def upgrade_statistics(layer_dir: Path, sae: Any) -> None:
    """Add the SAE's fingerprint to one layer's statistics config (after checking the old,
    weak SAE hash it recorded) and seal it."""
    stored = _needs(layer_dir, "sae_fingerprint")
    if stored is None:
        return
    config = stored["config"]
    legacy = cache.fingerprint({"w": float(sae.W_enc.detach().double().sum()), "d": sae.cfg.d_sae})
    if config.get("sae_hash") != legacy:
        raise CacheError(f"{layer_dir}: the statistics were computed with another SAE")
    cache.seal_stage(layer_dir, config={**config, "sae_fingerprint": sae_fingerprint(sae)})


def upgrade_features(directory: Path, saes: dict[int, Any]) -> None:
    """Record each layer's SAE fingerprint and the manifest in a feature set's features.json
    (and in its to_memory set). The SAE must be the one the set names (by folder)."""
    directory = Path(directory)
    path = directory / FEATURES_JSON
    meta = cache.read_json(path)
    if meta.get("to_memory"):
        upgrade_features(directory / TO_MEMORY_DIR, saes)
    for key, info in meta["layers"].items():
        sae = saes[int(key)]
        named = Path(info.get("sae_id", "")).name
        if named and named != Path(sae.cfg.metadata.sae_id).name:
            raise CacheError(f"{path}: layer {key} names SAE {named}, not {sae.cfg.metadata}")
        info["sae_fingerprint"] = sae_fingerprint(sae)
    meta[cache.MANIFEST] = cache.manifest(directory, [FEATURES_TENSORS])
    cache.write_json(path, meta)


def rename_stage_folder(model_dir: Path, old: str, new: str) -> Path:
    """``model_dir/new``, after moving ``model_dir/old`` there when only the old one exists
    (a stage folder renamed: ``grouped_prompts/`` is ``behaviours/`` now). The folder is
    moved whole, config and data untouched, so the stage is found, not recomputed. When it
    cannot be moved (a read-only cache) the old folder is returned and read where it is."""
    model_dir = Path(model_dir)
    source, target = model_dir / old, model_dir / new
    if target.exists() or not source.is_dir():
        if target.exists() and source.is_dir():
            logger.warning("%s and %s both exist; %s is used", source, target, target)
        return target
    try:
        os.rename(source, target)
    except OSError as e:
        logger.warning("cannot move %s to %s (%s); reading it where it is", source, target, e)
        return source
    logger.info("moved the stage folder %s to %s", source, target)
    return target


def upgrade_model_cache(model_dir: Path, dataset: str = "builtin") -> list[str]:
    """Upgrade every known stage of one model's cache folder (see the module docstring).
    Returns what was done, one line per stage."""
    from spare_tl.data.datasets import load_dataset
    from spare_tl.data.prompts import DEFAULT_POOL_SEED, DEFAULT_POOL_SIZE, split_pool
    from spare_tl.saes import load_sae, sae_layer_from_folder
    from spare_tl.stages.memorised import MemorisedSet

    model_dir = Path(model_dir)
    done: list[str] = []
    if (model_dir / LEGACY_STAGE).is_dir() and not (model_dir / BEHAVIOURS).exists():
        rename_stage_folder(model_dir, LEGACY_STAGE, BEHAVIOURS)
        done.append(f"moved {LEGACY_STAGE}/ to {BEHAVIOURS}/")
    items = load_dataset(dataset)
    memorised_dir = None
    for folder in sorted(p for p in (model_dir / "memorised").glob("*") if p.is_dir()):
        stored = cache.read_stage_config(folder)
        if stored and stored["config"].get("dataset") == dataset:
            memorised_dir = upgrade_memorised(folder, items)
            done.append(f"memorised: {memorised_dir}")
    saes = {
        sae_layer_from_folder(p): load_sae(p)
        for p in sorted((model_dir / "saes").glob("blocks.*"))
        if (p / "cfg.json").exists()
    }
    features_dir = model_dir / "functional_features"
    meta = cache.read_json(features_dir / FEATURES_JSON) if features_dir.is_dir() else {}
    if memorised_dir is not None and (model_dir / BEHAVIOURS).is_dir():
        known = MemorisedSet.load(memorised_dir).filter(items)
        split = split_pool(
            known,
            meta.get("metadata", {}).get("pool_size", DEFAULT_POOL_SIZE),
            meta.get("metadata", {}).get("pool_seed", DEFAULT_POOL_SEED),
        )
        upgrade_grouped(model_dir / BEHAVIOURS, split.pool)
        done.append(BEHAVIOURS)
    for layer_dir in sorted((model_dir / "mutual_information").glob("layer*")):
        upgrade_statistics(layer_dir, saes[int(layer_dir.name[5:])])
        done.append(f"mutual_information/{layer_dir.name}")
    if meta:
        upgrade_features(features_dir, saes)
        done.append("functional_features")
    for config_path in sorted(model_dir.rglob(cache.CONFIG)):
        stored = cache.read_json(config_path)
        if isinstance(stored, dict) and "fingerprint" in stored and cache.MANIFEST not in stored:
            cache.seal_stage(config_path.parent)
            done.append(f"sealed {config_path.parent.relative_to(model_dir)}")
    return done
