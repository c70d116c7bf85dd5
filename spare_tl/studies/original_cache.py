"""Read the SpARE paper's published ``cache_data/`` safely: tensors with ``weights_only=True``,
the memorised sets (pickled Python sets) with an allow-list unpickler.

:class:`OriginalCache` reads one model folder of the layout described in
:mod:`spare_tl.studies.original` (mutual information and expectation per layer, z̄_C / z̄_M,
the model's answers under conflict); :mod:`spare_tl.studies.original` imports and exports it.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from spare_tl.errors import MalformedCacheError, UnsafePickleError

logger = logging.getLogger(__name__)

__all__ = [
    "OriginalLayerStatistics",
    "MalformedCacheError",
    "OriginalCache",
    "OriginalPromptRecord",
    "UnsafePickleError",
    "load_memorised_set",
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
class OriginalLayerStatistics:
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

    def statistics(self, layer: int) -> OriginalLayerStatistics:
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
        return OriginalLayerStatistics(layer=layer, mutual_information=mi, expectation=expectation)

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


def as_cache(model_dir: str | Path | OriginalCache) -> OriginalCache:
    return model_dir if isinstance(model_dir, OriginalCache) else OriginalCache(model_dir)
