"""The memorised set: conflict items the model answers correctly closed-book.

Only for these is there a real conflict between context and memory. Each question is asked
closed-book with k demonstrations of the same relation (other questions, seeded), greedy,
and scored by exact match against ``org_answer``. Cached under
``cache_data/<model>/memorised/<name>-<items hash>/`` with the config that produced it: the
folder is named by the dataset's *content* (:func:`dataset_key`), so a user's file called
``builtin.jsonl`` can never land in, or overwrite, the built-in dataset's folder.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.data.datasets import load_dataset
from spare_tl.data.prompts import (
    DEFAULT_POOL_SEED,
    DEFAULT_POOL_SIZE,
    closed_book_prompt,
    split_pool,
)
from spare_tl.data.schema import ConflictItem, items_hash
from spare_tl.data.scoring import exact_match
from spare_tl.embedded import seed_from_shipped
from spare_tl.errors import CacheError
from spare_tl.generation import Decoding, greedy_generate

logger = logging.getLogger(__name__)
STAGE = "memorised"


@dataclass
class MemorisedSet:
    """Which items the model knows closed-book, with its answers."""

    model_name: str
    dataset: str
    questions: list[str]  # memorised questions, in dataset order
    predictions: list[dict[str, Any]]  # one record per dataset item
    config: dict[str, Any] = field(default_factory=dict)

    def filter(self, items: list[ConflictItem]) -> list[ConflictItem]:
        """The items whose question is memorised."""
        known = set(self.questions)
        return [it for it in items if it.question in known]

    def per_relation(self) -> dict[str, tuple[int, int]]:
        """relation -> (memorised, total)."""
        total = Counter(p["relation"] for p in self.predictions)
        known = Counter(p["relation"] for p in self.predictions if p["memorised"])
        return {r: (known[r], total[r]) for r in sorted(total)}

    @property
    def n_items(self) -> int:
        return len(self.predictions)

    def require(self, pool_size: int = 0) -> None:
        """Fail clearly when too few questions are memorised to split off a pool of
        ``pool_size`` and keep evaluation items."""
        n = len(self.questions)
        if n == 0:
            raise ValueError(
                f"0 of {self.n_items} questions of dataset {self.dataset!r} are memorised by "
                f"{self.model_name} (no closed-book exact match): SpARE needs questions the "
                "model knows; use a dataset it knows, or a larger model"
            )
        if pool_size and n <= pool_size:
            raise ValueError(
                f"only {n} of {self.n_items} questions of dataset {self.dataset!r} are "
                f"memorised by {self.model_name}: a pool of {pool_size} leaves no evaluation "
                f"items; use a pool size below {n}"
            )

    def stage_files(self) -> dict[str, Callable[[Path], None]]:
        """The stage's files as ``{name: atomic writer of that file's path}``."""
        summary = {
            "model": self.model_name,
            "dataset": self.dataset,
            "n_items": len(self.predictions),
            "n_memorised": len(self.questions),
            "per_relation": {r: list(v) for r, v in self.per_relation().items()},
        }
        return {
            "predictions.jsonl": lambda p: cache.write_jsonl(p, self.predictions),
            "summary.json": lambda p: cache.write_json(p, summary),
        }

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        cache.begin_stage(directory)
        files = self.stage_files()
        for name, write in files.items():
            write(directory / name)
        cache.mark_complete(directory, self.config, files=list(files))

    @classmethod
    def load(cls, directory: Path) -> MemorisedSet:
        """Load a completed stage, its files checked against the manifest first."""
        directory = Path(directory)
        cfg = cache.verify_stage(directory)["config"]
        preds = cache.read_jsonl(directory / "predictions.jsonl")
        summary = cache.read_json(directory / "summary.json")
        if len(preds) != summary["n_items"]:
            raise CacheError(
                f"{directory / 'predictions.jsonl'} holds {len(preds)} records, "
                f"summary.json says {summary['n_items']}; delete {directory} to recompute it"
            )
        return cls(
            model_name=summary["model"],
            dataset=summary["dataset"],
            questions=[p["question"] for p in preds if p["memorised"]],
            predictions=preds,
            config=cfg,
        )


def dataset_key(dataset_name: str, items: list[ConflictItem] | str) -> str:
    """The cache folder of a dataset: a readable name plus the hash of its items (or the
    hash itself), so two datasets share a folder only when their items are identical."""
    digest = items if isinstance(items, str) else items_hash(items)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(dataset_name)).stem or "dataset")
    return f"{name.strip('._') or 'dataset'}-{digest}"


def closed_book_demonstrations(
    items: list[ConflictItem], n_shots: int, seed: int
) -> list[list[ConflictItem]]:
    """For each item, ``n_shots`` other questions of the same relation.

    Each relation draws ``n_shots + 1`` demonstration questions once (seeded); an item uses
    the first ``n_shots`` of them that are not itself. So all items of a relation share one
    demonstration prefix (a few use a variant), which lets the prefix be computed once.
    """
    by_relation: dict[str, list[ConflictItem]] = {}
    for it in items:
        by_relation.setdefault(it.relation, []).append(it)
    drawn = {}
    for rel, members in by_relation.items():
        pool = members if len(members) > n_shots else items
        drawn[rel] = random.Random(f"{seed}:{rel}").sample(pool, min(n_shots + 1, len(pool)))
    out = []
    for it in items:
        others = [d for d in drawn[it.relation] if d.question != it.question]
        out.append(others[:n_shots])
    return out


def find_memorised(
    model,
    items: list[ConflictItem],
    *,
    dataset_name: str = "builtin",
    n_shots: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    min_shared: int = 8,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> MemorisedSet:
    """Closed-book greedy answers for ``items``; the memorised set is those with EM on M.

    Items sharing a demonstration prefix (at least ``min_shared`` of them) are answered with
    the prefix computed once; the rest in full-prompt batches. Batching does not change the
    answers, so ``batch_size`` and ``min_shared`` are not part of the cache key. Eight new
    tokens hold all but 13 of the built-in set's 2,585 answers; a closed-book answer still
    running after eight tokens is almost never an exact match.
    """
    if not items:
        raise ValueError(f"dataset {dataset_name!r} holds no items")
    config = memorised_config(model, items, dataset_name, n_shots, seed, max_new_tokens)
    directory = memorised_dir(model, items, dataset_name, cache_root)
    if use_cache and cache.is_fresh(directory, config):
        logger.info("memorised set: cached in %s", directory)
        return MemorisedSet.load(directory)
    demos, units = closed_book_units(items, n_shots, seed, min_shared)
    decoding = Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    answers = [""] * len(items)
    bar = tqdm(total=len(items), desc="closed-book answers", disable=not progress)
    for unit in units:
        for i, out in zip(unit, answer_unit(model, items, demos, unit, min_shared, decoding)):
            answers[i] = out
        bar.update(len(unit))
    bar.close()
    result = memorised_from_answers(model, items, answers, dataset_name, config)
    if use_cache:
        result.save(directory)
    return result


def memorised_config(
    model,
    items: list[ConflictItem],
    dataset_name: str,
    n_shots: int,
    seed: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """What a memorised set depends on (the stage's fingerprint)."""
    return {
        "stage": STAGE,
        "model": model.cfg.model_name,
        "dataset": dataset_name,
        "n_items": len(items),
        "questions_hash": cache.fingerprint({"q": [it.question for it in items]}),
        "items_hash": items_hash(items),
        "n_shots": n_shots,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "demonstrations": "same relation, drawn once per relation, shared prefix",
    }


def memorised_dir(
    model, items: list[ConflictItem], dataset_name: str, cache_root: Path | None = None
) -> Path:
    """The stage folder of ``items``' memorised set (named by their content)."""
    key = dataset_key(dataset_name, items_hash(items))
    return cache.stage_dir(model.cfg.model_name, f"{STAGE}/{key}", cache_root)


def closed_book_units(
    items: list[ConflictItem], n_shots: int, seed: int, min_shared: int
) -> tuple[list[list[ConflictItem]], list[list[int]]]:
    """Every item's demonstrations, and the items in units answered together: first the
    items whose prefix fewer than ``min_shared`` share (one batch of full prompts), then one
    unit per shared demonstration prefix. Each unit's answers do not depend on the others."""
    demos = closed_book_demonstrations(items, n_shots, seed)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, d in enumerate(demos):
        groups.setdefault(tuple(x.question for x in d), []).append(i)
    # Items that are themselves demonstrations use a variant prefix shared by one or two
    # items: one prefix pass each would cost more than answering them together in full.
    singles = [i for idx in groups.values() if len(idx) < min_shared for i in idx]
    shared = [idx for idx in groups.values() if len(idx) >= min_shared]
    return demos, ([singles] if singles else []) + shared


def answer_unit(
    model,
    items: list[ConflictItem],
    demos: list[list[ConflictItem]],
    unit: list[int],
    min_shared: int,
    decoding: Decoding,
) -> list[str]:
    """Closed-book greedy answers of one unit of :func:`closed_book_units` (a shared
    demonstration prefix computed once when the unit has one)."""
    if len(unit) < min_shared or len({tuple(x.question for x in demos[i]) for i in unit}) > 1:
        return greedy_generate(
            model, [closed_book_prompt(items[i], demos[i]) for i in unit], decoding=decoding
        )
    prefix = closed_book_prompt(items[unit[0]], demos[unit[0]])
    prefix = prefix[: prefix.rindex("question: ")]  # the shared demonstrations
    return greedy_generate(
        model, [closed_book_prompt(items[i]) for i in unit], prefix=prefix, decoding=decoding
    )


def memorised_from_answers(
    model,
    items: list[ConflictItem],
    answers: list[str],
    dataset_name: str,
    config: dict[str, Any],
) -> MemorisedSet:
    """The memorised set from every item's closed-book answer (exact match on M)."""
    preds = [
        {
            "question": it.question,
            "relation": it.relation,
            "prediction": ans,
            "org_answer": list(it.org_answer),
            "memorised": exact_match(ans, it.org_answer),
        }
        for it, ans in zip(items, answers)
    ]
    return MemorisedSet(
        model_name=model.cfg.model_name,
        dataset=dataset_name,
        questions=[p["question"] for p in preds if p["memorised"]],
        predictions=preds,
        config=config,
    )


def memorised_split(
    model,
    features,
    dataset: str = "builtin",
    *,
    pool_size: int | None = None,
    pool_seed: int | None = None,
    progress: bool = True,
):
    """The pool/evaluation split a feature set was built on: memorised items of ``dataset``,
    a pool of ``pool_size`` questions drawn with ``pool_seed`` (None: what the features'
    metadata records, else 128 and 42).

    The memorised set is read from the cache, seeded from the shipped one when the cache
    has none (an installed package: the shipped folder is never written).
    """
    items = load_dataset(dataset)
    name = Path(dataset).stem.replace("/", "_")
    root = cache.default_cache_root()
    slug = cache.model_slug(model.cfg.model_name)
    seed_from_shipped(f"{slug}/{STAGE}/{dataset_key(name, items)}", root)
    memorised = find_memorised(model, items, dataset_name=name, cache_root=root, progress=progress)
    meta = features.metadata
    if pool_size is None:
        pool_size = meta.get("pool_size", DEFAULT_POOL_SIZE)
    if pool_seed is None:
        pool_seed = meta.get("pool_seed", DEFAULT_POOL_SEED)
    memorised.require(pool_size)
    return split_pool(memorised.filter(items), pool_size, pool_seed)
