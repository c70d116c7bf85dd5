"""The embedded default's committed data: where it lives and how to load it in one call."""

from __future__ import annotations

from pathlib import Path

from spare_tl.cache import REPO_ROOT

EMBEDDED_DIR = REPO_ROOT / "cache_data" / "smollm2-135m-instruct"
DEFAULT_FEATURES = EMBEDDED_DIR / "functional_features"
DEFAULT_SAES = EMBEDDED_DIR / "saes"


def load_steering_setup(
    features_dir: str | Path = DEFAULT_FEATURES, saes_dir: str | Path = DEFAULT_SAES, model=None
):
    """``(model, features, saes)`` from a functional-feature folder and a folder of SAEs.

    Defaults to the embedded model's committed features and SAEs.
    """
    from spare_tl.features import FunctionalFeatures
    from spare_tl.models import load_model
    from spare_tl.saes import load_saes_for_layers

    features = FunctionalFeatures.load(features_dir)
    model = model if model is not None else load_model(features.model_name)
    saes = load_saes_for_layers(model, saes_dir, features.all_layers)
    return model, features, saes


def memorised_split(model, features, dataset: str = "builtin", *, progress: bool = True):
    """The pool/evaluation split a feature set was built on: memorised items of ``dataset``,
    pool size and seed from the features' metadata (defaults 128 and 42)."""
    from spare_tl.data.datasets import load_dataset
    from spare_tl.data.prompts import DEFAULT_POOL_SEED, DEFAULT_POOL_SIZE, split_pool
    from spare_tl.memorised import find_memorised

    items = load_dataset(dataset)
    memorised = find_memorised(
        model, items, dataset_name=Path(dataset).stem.replace("/", "_"), progress=progress
    )
    meta = features.metadata
    memorised.require(meta.get("pool_size", DEFAULT_POOL_SIZE))
    return split_pool(
        memorised.filter(items),
        meta.get("pool_size", DEFAULT_POOL_SIZE),
        meta.get("pool_seed", DEFAULT_POOL_SEED),
    )
