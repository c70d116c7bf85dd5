"""spare-tl: SpARE (Zhao et al., NAACL 2025) for TransformerLens + SAELens.

Find the sparse-autoencoder features that make a language model answer from its **context**
or from its **parametric memory** when the two conflict, and steer them at inference time.
"""

from __future__ import annotations

from spare_tl.lazy import lazy_getattr

__version__ = "0.1.0"

# Public names -> defining module; imported on first use so `import spare_tl` stays light.
_EXPORTS: dict[str, str] = {
    "load_model": "spare_tl.models",
    "EMBEDDED_MODEL": "spare_tl.embedded",
    "load_sae": "spare_tl.saes",
    "attach_sae": "spare_tl.saes",
    "validate_sae": "spare_tl.saes",
    "encode_latents": "spare_tl.saes",
    "load_steering_setup": "spare_tl.embedded",
    "FunctionalFeatures": "spare_tl.features",
    "LayerFeatures": "spare_tl.features",
    "select_functional_features": "spare_tl.features",
    "spare_edit": "spare_tl.methods.spare",
    "steer": "spare_tl.methods.spare",
    "mutual_information": "spare_tl.mutual_info",
    "exact_match": "spare_tl.data.scoring",
    "load_dataset": "spare_tl.data.datasets",
    "ConflictItem": "spare_tl.data.schema",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
