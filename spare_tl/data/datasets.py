"""Load a conflict dataset by name or path, mapped to :class:`~spare_tl.data.schema.ConflictItem`.

Names: ``builtin`` (or ``builtin:<version>``), ``nqswap`` (HF ``pminervini/NQ-Swap``, split
``dev``), ``macnoise`` (HF ``GWHed/dataset_macnoise``, split ``train_chatgpt[:5120]``, the
rows SpARE uses), or a path to a ``.jsonl`` file in the schema's layout (validated).

Hub datasets come through the local Hugging Face cache; this module never needs the hub
when the cache holds them. The row-to-item mapping of each hub dataset is a plain function
(:func:`nqswap_to_items`, :func:`macnoise_to_items`) that takes any iterable of row dicts,
so it is testable on a small ``datasets.Dataset`` without the hub.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spare_tl.data.schema import REQUIRED_FIELDS, ConflictItem, ValidationIssue, read_conflict_jsonl
from spare_tl.data.scoring import EM_IN_CONTEXT
from spare_tl.errors import DatasetError, DatasetUnavailableError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

NQSWAP_HUB_ID = "pminervini/NQ-Swap"
MACNOISE_HUB_ID = "GWHed/dataset_macnoise"


def _answers(value: Any) -> tuple[str, ...]:
    """An answer column as a tuple of strings (a bare string becomes a one-element tuple)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _rows_to_items(
    rows: Iterable[Mapping[str, Any]], source: str, extra: Mapping[str, Any]
) -> list[ConflictItem]:
    """Map rows in NQ-Swap's column layout to items; ``extra`` is added to every item.

    Each item records its row ``index`` in the loaded split (the memorised sets of the
    original code are row indices). Rows without a usable answer are skipped with a warning;
    a missing column is a :class:`DatasetError`.
    """
    items: list[ConflictItem] = []
    skipped = 0
    for index, row in enumerate(rows):
        missing = [c for c in REQUIRED_FIELDS if c not in row]
        if missing:
            raise DatasetError(
                source,
                [
                    ValidationIssue(
                        index + 1,
                        c,
                        f"missing column (row has {sorted(row)}); is this the right dataset?",
                    )
                    for c in missing
                ],
            )
        org_answer, sub_answer = _answers(row["org_answer"]), _answers(row["sub_answer"])
        if not org_answer or not sub_answer or not str(row["question"]).strip():
            skipped += 1
            continue
        items.append(
            ConflictItem(
                question=row["question"],
                org_context=row["org_context"],
                org_answer=org_answer,
                sub_context=row["sub_context"],
                sub_answer=sub_answer,
                relation="",
                extra={"source": source, "index": index, **extra},
            )
        )
    if skipped:
        logger.warning("%s: skipped %d rows without a question or an answer", source, skipped)
    return items


def nqswap_to_items(rows: Iterable[Mapping[str, Any]]) -> list[ConflictItem]:
    """NQ-Swap rows (``question``, ``org_context``, ``org_answer: list``, ``sub_context``,
    ``sub_answer: list``) as items; NQ-Swap has no relation labels, so ``relation`` is ``""``."""
    return _rows_to_items(rows, "nqswap", {})


def macnoise_to_items(rows: Iterable[Mapping[str, Any]]) -> list[ConflictItem]:
    """Macnoise rows (NQ-Swap's columns) as items scored with the in-context EM variant.

    ``sub_context`` is a generated counterfactual passage whose answer need not be spelled as
    ``sub_answer``; so ``extra["em_in_context"]`` is set and a context answer counts when it
    occurs in ``sub_context``. Macnoise has no relation labels: ``relation`` is ``""``.
    """
    return _rows_to_items(rows, "macnoise", {EM_IN_CONTEXT: True})


@dataclass(frozen=True)
class HubConflictDataset:
    """A conflict dataset on the Hugging Face hub and how its rows map to the schema."""

    name: str
    hub_id: str
    default_split: str
    to_items: Callable[[Iterable[Mapping[str, Any]]], list[ConflictItem]]


HUB_DATASETS: dict[str, HubConflictDataset] = {
    "nqswap": HubConflictDataset("nqswap", NQSWAP_HUB_ID, "dev", nqswap_to_items),
    # SpARE uses the first 5120 rows of train_chatgpt; its memorised sets index those rows.
    "macnoise": HubConflictDataset(
        "macnoise", MACNOISE_HUB_ID, "train_chatgpt[:5120]", macnoise_to_items
    ),
}
_ALIASES = {
    "nqswap": "nqswap",
    "nq-swap": "nqswap",
    NQSWAP_HUB_ID.lower(): "nqswap",
    "macnoise": "macnoise",
    MACNOISE_HUB_ID.lower(): "macnoise",
}


def fetch_hub_split(
    hub_id: str, split: str, cache_dir: str | os.PathLike[str] | None = None
) -> datasets.Dataset:
    """One split of a hub dataset, from the local HF cache when it is there.

    Raises :class:`DatasetUnavailableError` with instructions when the dataset is not cached
    and the hub cannot be reached.
    """
    import datasets

    try:
        return datasets.load_dataset(
            hub_id, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except (ConnectionError, OSError) as e:  # offline, unreachable, or not found
        cache = cache_dir or os.environ.get("HF_DATASETS_CACHE") or "~/.cache/huggingface"
        raise DatasetUnavailableError(
            f"dataset '{hub_id}' (split '{split}') is not in the local Hugging Face cache "
            f"({cache}) and the hub could not be reached ({type(e).__name__}: {e}). "
            "Once cached, no hub access is needed. To fix: load it once on a machine "
            "with internet access (e.g. `spare-tl data stats "
            f"{hub_id}`) and reuse or copy that cache here, then set HF_DATASETS_OFFLINE=1 "
            "(or pass cache_dir); or write the rows as a JSONL file in the schema's layout "
            "and pass its path instead."
        ) from e


def load_dataset(
    name_or_path: str | os.PathLike[str],
    *,
    split: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[ConflictItem]:
    """Load a conflict dataset: ``builtin[:version]``, ``nqswap``, ``macnoise``, a hub id of
    those two, or a ``.jsonl`` path. ``split`` and ``cache_dir`` apply to hub datasets only;
    ``limit`` keeps the first ``limit`` items."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    spec = str(name_or_path)
    key = spec.lower()
    if key == "builtin" or key.startswith("builtin:"):
        if split is not None:
            raise ValueError("split applies only to hub datasets, not to the built-in one")
        from spare_tl.data.builtin import load_builtin

        version = spec.split(":", 1)[1] if ":" in spec else "v1"
        items = load_builtin(version=version)
    elif key in _ALIASES:
        hub = HUB_DATASETS[_ALIASES[key]]
        ds = fetch_hub_split(hub.hub_id, split or hub.default_split, cache_dir)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        items = hub.to_items(ds)
    elif key.endswith(".jsonl") or Path(spec).is_file():
        if split is not None:
            raise ValueError("split applies only to hub datasets, not to a JSONL file")
        items = read_conflict_jsonl(spec)
    else:
        raise ValueError(
            f"unknown dataset {spec!r}: expected 'builtin[:VERSION]', "
            f"{', '.join(repr(n) for n in HUB_DATASETS)}, "
            f"{NQSWAP_HUB_ID!r}, {MACNOISE_HUB_ID!r} or a path to a .jsonl file"
        )
    return items if limit is None else items[:limit]
