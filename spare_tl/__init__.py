"""spare-tl: SpARE (Zhao et al., NAACL 2025) for TransformerLens + SAELens.

Find the sparse-autoencoder features that make a language model answer from its **context**
or from its **parametric memory** when the two conflict, and steer them at inference time.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

from spare_tl.lazy import lazy_getattr

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
    "spare_edit": "spare_tl.methods.spare",
    "steer": "spare_tl.methods.spare",
    "mutual_information": "spare_tl.mutual_info",
    "exact_match": "spare_tl.data.scoring",
    "load_dataset": "spare_tl.data.datasets",
    "ConflictItem": "spare_tl.data.schema",
    "load_statistics": "spare_tl.stages.activations",
    "load_feature_examples": "spare_tl.stages.feature_examples",
    "load_feature_effects": "spare_tl.stages.feature_effects",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__


# Modules that moved when the package took its layered shape (methods/, stages/, studies/,
# viz/, cli/). The old import paths keep working for one release: importing one returns the
# module at its new place (the same object, so monkeypatching either name patches both) and
# emits a DeprecationWarning naming the new path.
MOVED_MODULES: dict[str, str] = {
    "spare_tl.steering": "spare_tl.methods.spare",
    "spare_tl.probes": "spare_tl.studies.probes",
    "spare_tl.baselines": "spare_tl.studies.baselines",
    "spare_tl.harness": "spare_tl.stages.harness",
    "spare_tl.evaluation": "spare_tl.stages.evaluation",
    "spare_tl.memorised": "spare_tl.stages.memorised",
    "spare_tl.behaviours": "spare_tl.stages.behaviours",
    "spare_tl.activations": "spare_tl.stages.activations",
    "spare_tl.sweep": "spare_tl.stages.sweep",
    "spare_tl.scan": "spare_tl.stages.scan",
    "spare_tl.pipeline": "spare_tl.stages.pipeline",
    "spare_tl.train_saes": "spare_tl.stages.train_saes",
    "spare_tl.migrations": "spare_tl.stages.migrations",
    "spare_tl.results": "spare_tl.studies.results",
    "spare_tl.original": "spare_tl.studies.original",
    "spare_tl.saved_studies": "spare_tl.studies.saved",
    "spare_tl.conflict_table": "spare_tl.studies.conflict_table",
    "spare_tl.inspector": "spare_tl.viz.inspector",
    "spare_tl.cli_commands": "spare_tl.cli.commands",
    "spare_tl.results_doc": "spare_tl.cli.docs",
    "spare_tl.demo": "spare_tl.cli.demo",
    "spare_tl.data.cli": "spare_tl.cli.data",
    "spare_tl.viz.report_cli": "spare_tl.cli.report",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path in :data:`MOVED_MODULES` to the module at its new path."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
