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

import argparse
import io
import json
import logging
import pickle
import re
import sys
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from spare_tl.cache import begin_stage, mark_complete, write_json, write_jsonl, write_tensors
from spare_tl.checks import finite_non_negative
from spare_tl.checks import output_dir as check_output_dir
from spare_tl.features import FunctionalFeatures, LayerFeatures, select_functional_features
from spare_tl.saes import check_latent_code

logger = logging.getLogger(__name__)

__all__ = [
    "PAPER_SETTINGS",
    "LayerStatistics",
    "MalformedCacheError",
    "OriginalCache",
    "OriginalPromptRecord",
    "PaperSetting",
    "UnsafePickleError",
    "export_grouped_prompts",
    "export_statistics",
    "import_original",
    "load_memorised_set",
    "register",
]

Behaviour = Literal["context", "memory", "neither"]
PromptType = Literal["dss", "dso", "doo"]
Dataset = Literal["nqswap", "macnoise"]

MI_DIR = "mutual_information"
FUNC_DIR = Path("func_weights") / "grouped_activations"
PROMPTS_DIR = "grouped_prompts"
CONTEXT_WEIGHT = "use_context_weight.pt"
MEMORY_WEIGHT = "use_parameter_weight.pt"
DEFAULT_HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"
SOURCE = "spare-original-cache"

_MI_FILE = re.compile(r"^layer-(\d+) mi_expectation\.pt$")
_FUNC_DIR = re.compile(r"^layer(\d+)$")
_PROMPTS_FILE = re.compile(r"^(\d+)shot-seed(\d+)-results\.json$")
_RECORD_KEYS = (
    "sub_answer",
    "org_answer",
    "pred_answer",
    "sub_answer_em",
    "org_answer_em",
    "item_idx",
    "demonstration_ids",
    "prompt_type",
    "ss_loss",
    "so_loss",
)


class MalformedCacheError(ValueError):
    """A file of the original cache does not hold what the layout promises."""


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something outside the allow-list (refused, nothing was run)."""


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
# Safe loading
# --------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = frozenset(
    (module, name)
    for module in ("builtins", "__builtin__")
    for name in ("set", "frozenset", "int", "list", "tuple", "bool", "float", "str")
)


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and scalars; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class("builtins", name)
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name}: only builtin sets, lists, tuples and "
            "scalars are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing persistent ids (tensor storages) in a memorised set")


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of ``path``: ``<archive>/data.pkl`` of a torch zip, else the file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                raise MalformedCacheError(f"{path}: torch archive without data.pkl")
            return zf.read(names[0])
    return path.read_bytes()


def _allow_list_unpickle(path: Path) -> Any:
    try:
        return _AllowListUnpickler(io.BytesIO(_pickle_bytes(path))).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        raise MalformedCacheError(f"{path}: not a readable pickle ({e})") from e


def load_memorised_set(path: str | Path) -> frozenset[int]:
    """A memorised set (pickled Python ``set`` of row indices), loaded without running code.

    A torch zip file is tried with ``torch.load(weights_only=True)`` first (recent torch
    allows sets there); when that refuses, and for plain pickles, an allow-list unpickler
    that admits only builtin containers and scalars reads it. Any other global raises
    :class:`UnsafePickleError` before it is called.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no memorised set at {path}")
    obj: Any = None
    loaded = False
    if zipfile.is_zipfile(path):  # torch's format; a plain pickle goes to the allow-list
        try:
            obj, loaded = torch.load(path, map_location="cpu", weights_only=True), True
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            logger.debug("torch.load(weights_only=True) refused %s (%s)", path, e)
    if not loaded:
        obj = _allow_list_unpickle(path)
    if not isinstance(obj, (set, frozenset, list, tuple)):
        raise MalformedCacheError(
            f"{path}: expected a set of row indices, got {type(obj).__name__}"
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in obj):
        raise MalformedCacheError(f"{path}: the memorised set holds non-integer entries")
    return frozenset(obj)


def _load_tensor_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; report only what was refused
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line]
        if refused:
            raise UnsafePickleError(
                f"{path}: refused, it holds more than tensors ({refused[0].strip()})"
            ) from None
        raise MalformedCacheError(f"{path}: cannot be read as a torch file (corrupt?)") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise MalformedCacheError(f"{path}: cannot be read as a torch file ({e})") from e


def _check_vector(path: Path, name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise MalformedCacheError(f"{path}: {name} is a {type(value).__name__}, not a tensor")
    if value.ndim != 1 or value.numel() == 0 or not value.is_floating_point():
        raise MalformedCacheError(
            f"{path}: {name} must be a non-empty 1-D float tensor [d_sae], got "
            f"{value.dtype} {tuple(value.shape)}"
        )
    return value.detach().cpu()


# --------------------------------------------------------------------------------------
# Typed records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerStatistics:
    """The paper's per-latent mutual information and expectation difference at one layer."""

    layer: int
    mutual_information: Float[Tensor, " d_sae"]  # float64, I(Z_i; Y)
    expectation: Float[Tensor, " d_sae"]  # E[Z_i | context] - E[Z_i | memory]

    @property
    def d_sae(self) -> int:
        return int(self.mutual_information.shape[0])


@dataclass(frozen=True)
class OriginalPromptRecord:
    """One grouped prompt of the original cache, in the paper's words.

    ``behaviour`` comes from the recorded exact matches: ``context`` when the answer matches
    the substituted answer C only, ``memory`` when it matches the original answer M only,
    ``neither`` otherwise (also when it matches both, which the cache never records).
    ``ss_loss`` / ``so_loss`` are the original losses of continuing with C / with M.
    """

    item_idx: int
    prompt_type: PromptType
    shots: int
    seed: int
    behaviour: Behaviour
    prediction: str
    sub_answer: tuple[str, ...]
    org_answer: tuple[str, ...]
    context_match: bool
    memory_match: bool
    demonstration_ids: tuple[int, ...]
    ss_loss: float
    so_loss: float

    @property
    def confidence(self) -> float:
        """The paper's weight for this prompt's behaviour (0 for ``neither``)."""
        total = self.ss_loss + self.so_loss
        if self.behaviour == "neither" or total <= 0:
            return 0.0
        return (self.so_loss if self.behaviour == "context" else self.ss_loss) / total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("sub_answer", "org_answer", "demonstration_ids"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OriginalPromptRecord:
        return cls(
            **{
                **d,
                "sub_answer": tuple(d["sub_answer"]),
                "org_answer": tuple(d["org_answer"]),
                "demonstration_ids": tuple(d["demonstration_ids"]),
            }
        )

    @classmethod
    def from_original(
        cls, raw: Mapping[str, Any], shots: int, seed: int, where: str = "record"
    ) -> OriginalPromptRecord:
        """Convert one record of ``<k>shot-seed<s>-results.json``."""
        if not isinstance(raw, Mapping):
            raise MalformedCacheError(f"{where}: expected an object, got {type(raw).__name__}")
        missing = [k for k in _RECORD_KEYS if k not in raw]
        if missing:
            raise MalformedCacheError(f"{where}: missing keys {missing}")
        prompt_type = str(raw["prompt_type"]).removesuffix("_s")
        if prompt_type not in ("dss", "dso", "doo"):
            raise MalformedCacheError(
                f"{where}: prompt_type {raw['prompt_type']!r} is not dss_s, dso_s or doo_s"
            )
        try:
            context_match = bool(int(raw["sub_answer_em"]))
            memory_match = bool(int(raw["org_answer_em"]))
            behaviour: Behaviour = (
                "context"
                if context_match and not memory_match
                else "memory"
                if memory_match and not context_match
                else "neither"
            )
            return cls(
                item_idx=int(raw["item_idx"]),
                prompt_type=prompt_type,  # type: ignore[arg-type]
                shots=shots,
                seed=seed,
                behaviour=behaviour,
                prediction=str(raw["pred_answer"]),
                sub_answer=tuple(str(a) for a in raw["sub_answer"]),
                org_answer=tuple(str(a) for a in raw["org_answer"]),
                context_match=context_match,
                memory_match=memory_match,
                demonstration_ids=tuple(int(i) for i in raw["demonstration_ids"]),
                ss_loss=float(raw["ss_loss"]),
                so_loss=float(raw["so_loss"]),
            )
        except (TypeError, ValueError) as e:
            raise MalformedCacheError(f"{where}: bad value ({e})") from e


# --------------------------------------------------------------------------------------
# The cache reader
# --------------------------------------------------------------------------------------


class OriginalCache:
    """One model folder of the original ``cache_data/`` (e.g. ``.../Meta-Llama-3-8B``)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.path = Path(model_dir).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"no SpARE cache folder at {self.path}")
        if not any((self.path / d).is_dir() for d in (MI_DIR, FUNC_DIR, PROMPTS_DIR)):
            raise FileNotFoundError(
                f"{self.path} is not a model folder of the SpARE cache: it has none of "
                f"{MI_DIR}/, {FUNC_DIR}/, {PROMPTS_DIR}/ (pass e.g. "
                f".../spare-original-cache/Meta-Llama-3-8B)"
            )

    def __repr__(self) -> str:
        return f"OriginalCache({str(self.path)!r})"

    @property
    def model_name(self) -> str:
        """The folder name, which the original code uses as the model name."""
        return self.path.name

    # -- layers ---------------------------------------------------------------------------

    def mi_path(self, layer: int) -> Path:
        return self.path / MI_DIR / f"layer-{layer} mi_expectation.pt"

    def functional_dir(self, layer: int) -> Path:
        return self.path / FUNC_DIR / f"layer{layer}"

    def mi_layers(self) -> list[int]:
        """Layers with a mutual-information file."""
        folder = self.path / MI_DIR
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MI_FILE.match(p.name)))

    def functional_layers(self) -> list[int]:
        """Layers with both functional activations (z̄_C and z̄_M)."""
        folder = self.path / FUNC_DIR
        if not folder.is_dir():
            return []
        return sorted(
            int(m.group(1))
            for p in folder.iterdir()
            if (m := _FUNC_DIR.match(p.name))
            and (p / CONTEXT_WEIGHT).is_file()
            and (p / MEMORY_WEIGHT).is_file()
        )

    # -- tensors --------------------------------------------------------------------------

    def statistics(self, layer: int) -> LayerStatistics:
        """Mutual information and expectation difference at ``layer``."""
        path = self.mi_path(layer)
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.model_name}: no mutual information for layer {layer} ({path.name} "
                f"missing); available layers: {self.mi_layers()}"
            )
        data = _load_tensor_file(path)
        if not isinstance(data, Mapping) or not {"mi_scores", "expectation"} <= set(data):
            keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
            raise MalformedCacheError(
                f"{path}: expected a dict with 'mi_scores' and 'expectation', got {keys}"
            )
        mi = _check_vector(path, "mi_scores", data["mi_scores"])
        expectation = _check_vector(path, "expectation", data["expectation"])
        if mi.shape != expectation.shape:
            raise MalformedCacheError(
                f"{path}: mi_scores {tuple(mi.shape)} and expectation "
                f"{tuple(expectation.shape)} differ in length"
            )
        return LayerStatistics(layer=layer, mutual_information=mi, expectation=expectation)

    def functional_activations(
        self, layer: int
    ) -> tuple[Float[Tensor, " d_sae"], Float[Tensor, " d_sae"]]:
        """(z̄_C, z̄_M) at ``layer``: the loss-weighted mean codes, before α."""
        folder = self.functional_dir(layer)
        paths = (folder / CONTEXT_WEIGHT, folder / MEMORY_WEIGHT)
        if not all(p.is_file() for p in paths):
            raise FileNotFoundError(
                f"{self.model_name}: layer {layer} has no functional activations "
                f"({FUNC_DIR}/layer{layer}/{CONTEXT_WEIGHT} and {MEMORY_WEIGHT}); layers "
                f"with them: {self.functional_layers()}"
            )
        context, memory = (_check_vector(p, p.stem, _load_tensor_file(p)) for p in paths)
        if context.shape != memory.shape:
            raise MalformedCacheError(
                f"{folder}: z̄_C {tuple(context.shape)} and z̄_M {tuple(memory.shape)} differ"
            )
        return context, memory

    # -- grouped prompts ------------------------------------------------------------------

    def grouped_prompt_files(self) -> list[tuple[int, int, Path]]:
        """(shots, seed, path) of every ``<k>shot-seed<s>-results.json``, sorted."""
        folder = self.path / PROMPTS_DIR
        if not folder.is_dir():
            return []
        found = [
            (int(m.group(1)), int(m.group(2)), p)
            for p in folder.iterdir()
            if (m := _PROMPTS_FILE.match(p.name))
        ]
        return sorted(found)

    def grouped_prompts(
        self, shots: Iterable[int] | None = None, seeds: Iterable[int] | None = None
    ) -> list[OriginalPromptRecord]:
        """The grouped prompts as typed records (optionally only some shots / seeds)."""
        files = self.grouped_prompt_files()
        if not files:
            raise FileNotFoundError(f"{self.model_name}: no grouped prompts in {PROMPTS_DIR}/")
        want_shots = None if shots is None else set(shots)
        want_seeds = None if seeds is None else set(seeds)
        records: list[OriginalPromptRecord] = []
        for k, seed, path in files:
            if (want_shots is not None and k not in want_shots) or (
                want_seeds is not None and seed not in want_seeds
            ):
                continue
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise MalformedCacheError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(raw, list):
                raise MalformedCacheError(f"{path}: expected a list of records")
            records.extend(
                OriginalPromptRecord.from_original(r, k, seed, where=f"{path.name}[{i}]")
                for i, r in enumerate(raw)
            )
        return records

    # -- memorised sets -------------------------------------------------------------------

    def memorised_set_path(self, dataset: Dataset = "nqswap") -> Path:
        """``<cache>/<dataset>-<model>-memorised_set`` beside the model folder."""
        if dataset not in ("nqswap", "macnoise"):
            raise ValueError(f"dataset must be 'nqswap' or 'macnoise', got {dataset!r}")
        return self.path.parent / f"{dataset}-{self.model_name}-memorised_set"

    def memorised_set(self, dataset: Dataset = "nqswap") -> frozenset[int]:
        """Row indices the model answers correctly closed-book (loaded safely)."""
        return load_memorised_set(self.memorised_set_path(dataset))


def _as_cache(model_dir: str | Path | OriginalCache) -> OriginalCache:
    return model_dir if isinstance(model_dir, OriginalCache) else OriginalCache(model_dir)


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
    finite_non_negative(edit_strength, "edit strength α")
    if edit_strength_to_memory is not None:
        finite_non_negative(edit_strength_to_memory, "edit strength α to memory")
    if not 0.0 < proportion <= 1.0:  # also refuses NaN
        raise ValueError(
            f"proportion K must be in (0, 1], got {proportion}; the paper uses 0.01-0.10"
        )
    cache = _as_cache(model_dir)
    code = check_latent_code(latent_code or ORIGINAL_LATENT_CODES.get(cache.model_name, "encode"))
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError("give at least one layer to import")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat: {layers}")
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
            stats.mutual_information, stats.expectation, proportion
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
    cache = _as_cache(model_dir)
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
    cache = _as_cache(model_dir)
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


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``spare-tl import-original``."""
    p = sub.add_parser(
        "import-original",
        help="import the SpARE paper's cached features (cache_data/<model>)",
        description=(
            "Select functional features from the original SpARE cache (mutual information, "
            "expectation, func_weights) and write them as a spare-tl feature set."
        ),
    )
    p.add_argument("model_dir", type=Path, help="e.g. .../spare-original-cache/Meta-Llama-3-8B")
    p.add_argument("--layers", type=int, nargs="+", required=True, help="layers to import")
    p.add_argument("--proportion", type=float, required=True, help="K, e.g. 0.07")
    p.add_argument("--edit-strength", type=float, default=1.0, help="α (default 1.0)")
    p.add_argument(
        "--edit-strength-to-memory", type=float, default=None, help="α when steering to memory"
    )
    p.add_argument("--hook-template", default=DEFAULT_HOOK_TEMPLATE, help="hook name with {layer}")
    p.add_argument("--output", type=Path, required=True, help="folder for the feature set")
    p.add_argument("--json", action="store_true", help="print per-layer counts as JSON")
    p.set_defaults(func=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    finite_non_negative(args.edit_strength, "--edit-strength α")
    if args.edit_strength_to_memory is not None:
        finite_non_negative(args.edit_strength_to_memory, "--edit-strength-to-memory α")
    check_output_dir(args.output)
    features = import_original(
        args.model_dir,
        layers=args.layers,
        proportion=args.proportion,
        edit_strength=args.edit_strength,
        edit_strength_to_memory=args.edit_strength_to_memory,
        hook_template=args.hook_template,
    )
    features.save(args.output)
    counts = features.counts()
    if args.json:
        json.dump(
            {
                "model_name": features.model_name,
                "proportion": features.proportion,
                "output": str(args.output),
                "layers": {str(k): {"context": c, "memory": m} for k, (c, m) in counts.items()},
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        for layer, (c, m) in counts.items():
            print(f"layer {layer}: {c} context, {m} memory features")
        print(f"wrote {args.output}")
    return 0
