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

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        cache.begin_stage(directory)
        cache.write_jsonl(directory / "predictions.jsonl", self.predictions)
        cache.write_json(
            directory / "summary.json",
            {
                "model": self.model_name,
                "dataset": self.dataset,
                "n_items": len(self.predictions),
                "n_memorised": len(self.questions),
                "per_relation": {r: list(v) for r, v in self.per_relation().items()},
            },
        )
        cache.mark_complete(directory, self.config, files=["predictions.jsonl", "summary.json"])

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
    content = items_hash(items)
    config = {
        "stage": STAGE,
        "model": model.cfg.model_name,
        "dataset": dataset_name,
        "n_items": len(items),
        "questions_hash": cache.fingerprint({"q": [it.question for it in items]}),
        "items_hash": content,
        "n_shots": n_shots,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "demonstrations": "same relation, drawn once per relation, shared prefix",
    }
    directory = cache.stage_dir(
        model.cfg.model_name, f"{STAGE}/{dataset_key(dataset_name, content)}", cache_root
    )
    if use_cache and cache.is_fresh(directory, config):
        logger.info("memorised set: cached in %s", directory)
        return MemorisedSet.load(directory)
    demos = closed_book_demonstrations(items, n_shots, seed)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, d in enumerate(demos):
        groups.setdefault(tuple(x.question for x in d), []).append(i)
    answers = [""] * len(items)
    decoding = Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    bar = tqdm(total=len(items), desc="closed-book answers", disable=not progress)
    # Items that are themselves demonstrations use a variant prefix shared by one or two
    # items: one prefix pass each would cost more than answering them together in full.
    singles = [i for idx in groups.values() if len(idx) < min_shared for i in idx]
    if singles:
        outs = greedy_generate(
            model,
            [closed_book_prompt(items[i], demos[i]) for i in singles],
            decoding=decoding,
        )
        for i, out in zip(singles, outs):
            answers[i] = out
        bar.update(len(singles))
    for idx in groups.values():
        if len(idx) < min_shared:
            continue
        prefix = closed_book_prompt(items[idx[0]], demos[idx[0]])
        prefix = prefix[: prefix.rindex("question: ")]  # the shared demonstrations
        outs = greedy_generate(
            model,
            [closed_book_prompt(items[i]) for i in idx],
            prefix=prefix,
            decoding=decoding,
        )
        for i, out in zip(idx, outs):
            answers[i] = out
        bar.update(len(idx))
    bar.close()
    preds = []
    for it, ans in zip(items, answers):
        preds.append(
            {
                "question": it.question,
                "relation": it.relation,
                "prediction": ans,
                "org_answer": list(it.org_answer),
                "memorised": exact_match(ans, it.org_answer),
            }
        )
    result = MemorisedSet(
        model_name=model.cfg.model_name,
        dataset=dataset_name,
        questions=[p["question"] for p in preds if p["memorised"]],
        predictions=preds,
        config=config,
    )
    if use_cache:
        result.save(directory)
    return result


def memorised_split(model, features, dataset: str = "builtin", *, progress: bool = True):
    """The pool/evaluation split a feature set was built on: memorised items of ``dataset``,
    pool size and seed from the features' metadata (defaults 128 and 42).

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
    memorised.require(meta.get("pool_size", DEFAULT_POOL_SIZE))
    return split_pool(
        memorised.filter(items),
        meta.get("pool_size", DEFAULT_POOL_SIZE),
        meta.get("pool_seed", DEFAULT_POOL_SEED),
    )
