"""spare-tl: SpARE (Zhao et al., NAACL 2025) for TransformerLens + SAELens.

Find the sparse-autoencoder features that make a language model answer from its **context**
or from its **parametric memory** when the two conflict, and steer them at inference time.

``import spare_tl`` is the front door: the names in ``__all__`` (listed with one line each in
docs/api.md) are all a notebook needs; figures and the report are :mod:`spare_tl.viz`. The
package's own modules are in floors: the ground floor (this folder: cache, models, SAEs,
generation, features, mutual information, data/, errors, checks) < methods/ < stages/ <
studies/ < viz/ < cli/, each importing only from its floor or below.
"""

from __future__ import annotations

from spare_tl.lazy import lazy_getattr

__version__ = "0.1.0"

# The front door: what a notebook needs, name -> defining module. Each loads on first use, so
# `import spare_tl` stays light (no torch until a name is used). docs/api.md describes each
# (tests/test_front_door.py keeps the two in sync).
_EXPORTS: dict[str, str] = {
    # the model, its SAEs and the embedded default's committed steering setup
    "EMBEDDED_MODEL": "spare_tl.embedded",
    "EMBEDDED_DIR": "spare_tl.embedded",
    "DEFAULT_FEATURES": "spare_tl.embedded",
    "DEFAULT_SAES": "spare_tl.embedded",
    "load_steering_setup": "spare_tl.embedded",
    "load_model": "spare_tl.models",
    "load_sae": "spare_tl.saes",
    "attach_sae": "spare_tl.saes",
    "validate_sae": "spare_tl.saes",
    "encode_latents": "spare_tl.saes",
    # data: items, datasets, prompts, decoding, scoring
    "ConflictItem": "spare_tl.data.schema",
    "read_conflict_jsonl": "spare_tl.data.schema",
    "write_conflict_jsonl": "spare_tl.data.schema",
    "load_dataset": "spare_tl.data.datasets",
    "conflict_prompt": "spare_tl.data.prompts",
    "closed_book_prompt": "spare_tl.data.prompts",
    "sample_demonstrations": "spare_tl.data.prompts",
    "split_pool": "spare_tl.data.prompts",
    "greedy_generate": "spare_tl.generation",
    "exact_match": "spare_tl.data.scoring",
    # features and steering
    "DirectionSetting": "spare_tl.features",
    "FunctionalFeatures": "spare_tl.features",
    "LayerFeatures": "spare_tl.features",
    "select_functional_features": "spare_tl.features",
    "mutual_information": "spare_tl.mutual_info",
    "spare_edit": "spare_tl.methods.spare",
    "steer": "spare_tl.methods.spare",
    # the stages, the pipeline and the evaluation
    "find_memorised": "spare_tl.stages.memorised",
    "memorised_split": "spare_tl.stages.memorised",
    "BehaviourConfig": "spare_tl.stages.behaviours",
    "GroupedPrompts": "spare_tl.stages.behaviours",
    "last_position_resid": "spare_tl.stages.activations",
    "LayerStatistics": "spare_tl.stages.statistics",
    "load_statistics": "spare_tl.studies.saved",
    "load_feature_examples": "spare_tl.stages.feature_examples",
    "load_feature_effects": "spare_tl.stages.feature_effects",
    "EvaluationConfig": "spare_tl.stages.evaluation",
    "EvaluationResult": "spare_tl.stages.evaluation",
    "evaluate": "spare_tl.stages.evaluation",
    "PipelineConfig": "spare_tl.stages.pipeline",
    "run_pipeline": "spare_tl.stages.pipeline",
    # a tiny random model and SAE, for trying things offline
    "save_tiny_hf_llama": "spare_tl.testing",
    "tiny_sae": "spare_tl.testing",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
