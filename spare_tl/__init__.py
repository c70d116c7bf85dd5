"""spare-tl: SpARE (Zhao et al., NAACL 2025) for TransformerLens + SAELens.

Find the sparse-autoencoder features that make a language model answer from its **context**
or from its **parametric memory** when the two conflict, and steer them at inference time.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module; imported on first use so `import spare_tl` stays light.
_EXPORTS: dict[str, str] = {
    "load_model": "spare_tl.models",
    "EMBEDDED_MODEL": "spare_tl.models",
    "load_sae": "spare_tl.saes",
    "attach_sae": "spare_tl.saes",
    "validate_sae": "spare_tl.saes",
    "encode_latents": "spare_tl.saes",
    "load_steering_setup": "spare_tl.embedded",
    "FunctionalFeatures": "spare_tl.features",
    "LayerFeatures": "spare_tl.features",
    "select_functional_features": "spare_tl.features",
    "spare_edit": "spare_tl.steering",
    "steer": "spare_tl.steering",
    "mutual_information": "spare_tl.mutual_info",
    "exact_match": "spare_tl.data.scoring",
    "load_dataset": "spare_tl.data.datasets",
    "ConflictItem": "spare_tl.data.schema",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spare_tl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
