"""Read the SpARE paper's published ``cache_data/`` and bring it into spare-tl's formats.

The original repository (Zhao et al., NAACL 2025) ships, per model folder
(``Meta-Llama-3-8B``, ``Llama-2-7b-hf``, ``gemma-2-9b``):

- ``mutual_information/layer-<L> mi_expectation.pt`` (note the space): a torch pickle of
  ``{"mi_scores": float64 [d_sae], "expectation": float32 [d_sae]}``;
- ``func_weights/grouped_activations/layer<L>/use_context_weight.pt`` and
  ``use_parameter_weight.pt``: z̄_C and z̄_M, float32 [d_sae], before the edit strength α;
- ``grouped_prompts/<k>shot-seed<s>-results.json``: the model's greedy answers under
  knowledge conflict, with exact-match flags and the losses ``ss_loss`` / ``so_loss``;
- beside the model folders: ``nqswap-<model>-memorised_set`` and
  ``macnoise-<model>-memorised_set``, torch pickles of a Python ``set`` of row indices.

:class:`OriginalCache` reads that layout (tensors with ``weights_only=True``, the sets with an
allow-list unpickler), :func:`import_original` turns it into a :class:`FunctionalFeatures`
set with the paper's selection rule, and :func:`export_statistics` /
:func:`export_grouped_prompts` write the statistics and records as safetensors + JSON(L).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from spare_tl.cache import begin_stage, mark_complete, write_json, write_jsonl, write_tensors
from spare_tl.errors import MalformedCacheError, UnsafePickleError
from spare_tl.features import (
    DirectionSetting,
    FunctionalFeatures,
    LayerFeatures,
    select_functional_features,
)
from spare_tl.saes import check_latent_code
from spare_tl.studies.original_cache import (
    DEFAULT_HOOK_TEMPLATE,
    SOURCE,
    OriginalCache,
    OriginalLayerStatistics,
    OriginalPromptRecord,
    as_cache,
    load_memorised_set,
)

logger = logging.getLogger(__name__)

# the reader's names stay importable from here
__all__ = [
    "DEFAULT_HOOK_TEMPLATE",
    "PAPER_SETTINGS",
    "OriginalLayerStatistics",
    "MalformedCacheError",
    "OriginalCache",
    "OriginalPromptRecord",
    "PaperSetting",
    "UnsafePickleError",
    "export_grouped_prompts",
    "export_statistics",
    "import_original",
    "load_memorised_set",
]

# --------------------------------------------------------------------------------------
# The paper's settings (docs/method.md, "Evaluation")
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperSetting:
    """Layers, K and α the paper used for one model."""

    layers: tuple[int, ...]
    proportion: float
    edit_strength: float
    edit_strength_to_memory: float | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`import_original`."""
        return {
            "layers": list(self.layers),
            "proportion": self.proportion,
            "edit_strength": self.edit_strength,
            "edit_strength_to_memory": self.edit_strength_to_memory,
        }


PAPER_SETTINGS: dict[str, PaperSetting] = {
    "Meta-Llama-3-8B": PaperSetting((13, 14, 15, 16), 0.07, 2.0),
    "Llama-2-7b-hf": PaperSetting((12, 13, 14, 15), 0.07, 2.0),  # paper text: K=0.06, α=2.2
    "gemma-2-9b": PaperSetting((23, 24, 25, 29, 30, 31), 0.01, 3.0, 1.8),
}

# The SAE code the original statistics and z̄ were computed on: ReLU pre-activations before the
# top-k cut for the TopK SAEs of the Llama models, the post-JumpReLU code for Gemma Scope.
ORIGINAL_LATENT_CODES: dict[str, str] = {
    "Meta-Llama-3-8B": "relu_pre",
    "Llama-2-7b-hf": "relu_pre",
    "gemma-2-9b": "encode",
}


# --------------------------------------------------------------------------------------
# Import and export
# --------------------------------------------------------------------------------------


def import_original(
    model_dir: str | Path | OriginalCache,
    layers: Sequence[int],
    proportion: float,
    edit_strength: float = 1.0,
    edit_strength_to_memory: float | None = None,
    hook_template: str = DEFAULT_HOOK_TEMPLATE,
    sae_ids: Mapping[int, str] | None = None,
    model_name: str | None = None,
    latent_code: str | None = None,
) -> FunctionalFeatures:
    """The paper's functional features at ``layers`` and proportion K, as spare-tl features.

    ``latent_code`` defaults to the code the original statistics were computed on
    (:data:`ORIGINAL_LATENT_CODES`: ``"relu_pre"`` for the Llama TopK SAEs, ``"encode"`` for
    Gemma Scope), so spare-tl's edit encodes as the original code did.

    Selection uses :func:`select_functional_features` on the cached MI and expectation;
    z̄_C / z̄_M come from ``func_weights``. ``hook_template`` names each layer's hook
    (``{layer}`` is filled in); ``sae_ids`` records which SAE each layer needs.
    ``PAPER_SETTINGS[model].as_kwargs()`` gives the paper's layers, K and α.
    """
    layers = [int(layer) for layer in layers]
    setting = DirectionSetting(
        layers=tuple(layers), proportion=proportion, edit_strength=edit_strength
    )
    if edit_strength_to_memory is not None:
        DirectionSetting.from_mapping(
            {"edit_strength": edit_strength_to_memory}, setting, name="to memory"
        )
    if not layers:
        raise ValueError("give at least one layer to import")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat: {layers}")
    cache = as_cache(model_dir)
    code = check_latent_code(latent_code or ORIGINAL_LATENT_CODES.get(cache.model_name, "encode"))
    if "{layer}" not in hook_template:
        raise ValueError(f"hook_template must contain '{{layer}}', got {hook_template!r}")
    sae_ids = dict(sae_ids or {})
    unknown = sorted(set(sae_ids) - set(layers))
    if unknown:
        raise ValueError(f"sae_ids name layers {unknown} that are not imported ({layers})")
    mi_layers, func_layers = cache.mi_layers(), cache.functional_layers()
    for layer in layers:
        if layer not in mi_layers:
            raise FileNotFoundError(
                f"{cache.model_name}: no mutual information for layer {layer}; available "
                f"layers: {mi_layers}"
            )
        if layer not in func_layers:
            raise FileNotFoundError(
                f"{cache.model_name}: layer {layer} has mutual information but no functional "
                f"activations (func_weights); layers with them: {func_layers}"
            )

    out: dict[int, LayerFeatures] = {}
    selected: dict[str, int] = {}
    for layer in layers:
        stats = cache.statistics(layer)
        context_mean, memory_mean = cache.functional_activations(layer)
        if context_mean.shape[0] != stats.d_sae:
            raise MalformedCacheError(
                f"{cache.model_name} layer {layer}: mutual information has {stats.d_sae} "
                f"latents but the functional activations have {context_mean.shape[0]}"
            )
        context_ids, memory_ids = select_functional_features(
            stats.mutual_information, stats.expectation, setting.proportion
        )
        out[layer] = LayerFeatures(
            layer=layer,
            hook_name=hook_template.format(layer=layer),
            context_features=context_ids,
            memory_features=memory_ids,
            context_activations=context_mean.float(),
            memory_activations=memory_mean.float(),
            sae_id=sae_ids.get(layer, ""),
            latent_code=code,
        )
        selected[str(layer)] = int(context_ids.numel() + memory_ids.numel())
        logger.info(
            "%s layer %d: %d context, %d memory features",
            cache.model_name,
            layer,
            context_ids.numel(),
            memory_ids.numel(),
        )
    return FunctionalFeatures(
        model_name=model_name or cache.model_name,
        layers=out,
        proportion=proportion,
        edit_strength=edit_strength,
        edit_strength_to_memory=edit_strength_to_memory,
        metadata={
            "source": SOURCE,
            "source_model": cache.model_name,
            "source_dir": str(cache.path),
            "selected_per_layer": selected,
        },
    )


def export_statistics(
    model_dir: str | Path | OriginalCache,
    output_dir: str | Path,
    layers: Sequence[int] | None = None,
) -> Path:
    """Write the cached MI and expectation as ``statistics.safetensors`` + ``statistics.json``.

    Tensors are keyed ``layer{L}.mutual_information`` (float64) and ``layer{L}.expectation``
    (float32); the JSON holds per-layer summaries (total MI, maximum, non-zero latents) for
    layer-wise plots. ``layers`` defaults to every layer with an MI file.
    """
    cache = as_cache(model_dir)
    layers = cache.mi_layers() if layers is None else [int(layer) for layer in layers]
    if not layers:
        raise FileNotFoundError(f"{cache.model_name}: no mutual-information files to export")
    output_dir = Path(output_dir)
    tensors: dict[str, Tensor] = {}
    summary: dict[str, dict[str, float | int]] = {}
    for layer in layers:
        stats = cache.statistics(layer)
        mi = stats.mutual_information
        tensors[f"layer{layer}.mutual_information"] = mi
        tensors[f"layer{layer}.expectation"] = stats.expectation
        summary[str(layer)] = {
            "d_sae": stats.d_sae,
            "total_mutual_information": float(mi.sum()),
            "max_mutual_information": float(mi.max()),
            "nonzero_mutual_information": int((mi > 0).sum()),
            "positive_expectation": int((stats.expectation > 0).sum()),
            "negative_expectation": int((stats.expectation < 0).sum()),
        }
    begin_stage(output_dir)
    write_tensors(output_dir / "statistics.safetensors", tensors, {"source": SOURCE})
    write_json(
        output_dir / "statistics.json",
        {"model_name": cache.model_name, "source": SOURCE, "layers": layers, "summary": summary},
    )
    mark_complete(
        output_dir,
        {"stage": "statistics", "source": SOURCE, "model": cache.model_name, "layers": layers},
    )
    return output_dir


def export_grouped_prompts(model_dir: str | Path | OriginalCache, output_dir: str | Path) -> Path:
    """Write the grouped prompts as ``grouped_prompts.jsonl`` + a ``grouped_prompts.json``
    summary (counts by behaviour, by prompt type and behaviour, and by shots/seed)."""
    cache = as_cache(model_dir)
    records = cache.grouped_prompts()
    output_dir = Path(output_dir)
    write_jsonl(output_dir / "grouped_prompts.jsonl", (r.to_dict() for r in records))
    by_type: dict[str, dict[str, int]] = {}
    for r in records:
        by_type.setdefault(r.prompt_type, Counter())[r.behaviour] += 1  # type: ignore[index]
    write_json(
        output_dir / "grouped_prompts.json",
        {
            "model_name": cache.model_name,
            "source": SOURCE,
            "n_records": len(records),
            "behaviours": dict(Counter(r.behaviour for r in records)),
            "by_prompt_type": {k: dict(v) for k, v in sorted(by_type.items())},
            "runs": [{"shots": k, "seed": s} for k, s, _ in cache.grouped_prompt_files()],
            "items": len({r.item_idx for r in records}),
        },
    )
    return output_dir
