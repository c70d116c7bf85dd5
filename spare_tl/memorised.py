"""The memorised set: conflict items the model answers correctly closed-book.

Only for these is there a real conflict between context and memory. Each question is asked
closed-book with k demonstrations of the same relation (other questions, seeded), greedy,
and scored by exact match against ``org_answer``. Cached under
``cache_data/<model>/memorised/`` with the config that produced it.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.data.prompts import closed_book_prompt
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import exact_match
from spare_tl.generation import greedy_generate

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

    def save(self, directory: Path) -> None:
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
        cache.mark_complete(directory, self.config)

    @classmethod
    def load(cls, directory: Path) -> MemorisedSet:
        preds = cache.read_jsonl(directory / "predictions.jsonl")
        summary = cache.read_json(directory / "summary.json")
        cfg = cache.read_json(directory / "config.json")["config"]
        return cls(
            model_name=summary["model"],
            dataset=summary["dataset"],
            questions=[p["question"] for p in preds if p["memorised"]],
            predictions=preds,
            config=cfg,
        )


def closed_book_demonstrations(
    items: list[ConflictItem], n_shots: int, seed: int
) -> list[list[ConflictItem]]:
    """For each item, ``n_shots`` other items of the same relation (seeded)."""
    by_relation: dict[str, list[ConflictItem]] = {}
    for it in items:
        by_relation.setdefault(it.relation, []).append(it)
    out = []
    for i, it in enumerate(items):
        others = [d for d in by_relation[it.relation] if d.question != it.question]
        if len(others) < n_shots:
            others = [d for d in items if d.question != it.question]
        out.append(random.Random(f"{seed}:{i}").sample(others, n_shots))
    return out


def find_memorised(
    model,
    items: list[ConflictItem],
    *,
    dataset_name: str = "builtin",
    n_shots: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 12,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> MemorisedSet:
    """Closed-book greedy answers for ``items``; the memorised set is those with EM on M."""
    config = {
        "stage": STAGE,
        "model": model.cfg.model_name,
        "dataset": dataset_name,
        "n_items": len(items),
        "questions_hash": cache.fingerprint({"q": [it.question for it in items]}),
        "n_shots": n_shots,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "demonstrations": "same relation, other questions",
    }
    directory = cache.stage_dir(model.cfg.model_name, f"{STAGE}/{dataset_name}", cache_root)
    if use_cache and cache.is_fresh(directory, config):
        logger.info("memorised set: cached in %s", directory)
        return MemorisedSet.load(directory)
    demos = closed_book_demonstrations(items, n_shots, seed)
    prompts = [closed_book_prompt(it, d) for it, d in zip(items, demos)]
    answers = greedy_generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        desc="closed-book answers",
    )
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
