"""The SAEs' training text: conflict prompts of every demonstration type, packed into rows
that start at a prompt start (:mod:`spare_tl.stages.train_saes`)."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from spare_tl.data.prompts import (
    closed_book_prompt,
    conflict_prompt,
    question_key,
    sample_demonstrations,
)
from spare_tl.data.schema import ConflictItem
from spare_tl.stages.sae_config import (
    CLOSED_SHOTS,
    CONFLICT_SHOTS,
    ORG_CONTEXT_SHARE,
    PROMPT_KIND_WEIGHTS,
    SAETrainingConfig,
)

logger = logging.getLogger(__name__)


def split_items(
    items: Sequence[ConflictItem], heldout_fraction: float, seed: int
) -> tuple[list[ConflictItem], list[ConflictItem]]:
    """Split items into (training, held-out) by distinct question (seeded)."""
    groups: dict[str, list[ConflictItem]] = {}
    for item in items:
        groups.setdefault(question_key(item), []).append(item)
    keys = sorted(groups)
    if len(keys) < 2:
        raise ValueError(f"need at least 2 distinct questions to hold some out, got {len(keys)}")
    n_heldout = min(len(keys) - 1, max(1, round(heldout_fraction * len(keys))))
    heldout_keys = set(random.Random(f"heldout:{seed}").sample(keys, n_heldout))
    train = [it for k in keys if k not in heldout_keys for it in groups[k]]
    heldout = [it for k in keys if k in heldout_keys for it in groups[k]]
    return train, heldout


def _answer_taught(item: ConflictItem, kind: str, context: str) -> str:
    """The answer the demonstrations' rule gives: memory for dso/closed, the context otherwise."""
    if kind in ("dso", "closed") or context == "org":
        return item.org_answer[0]
    return item.sub_answer[0]


def prompt_texts(
    items: Sequence[ConflictItem], seed: int, *, with_answer: bool = True
) -> Iterator[tuple[str, str]]:
    """An endless seeded stream of ``(kind, text)``: SpARE-format prompts over ``items``.

    Each pass shuffles the items; every item is the test item of one prompt whose kind,
    shot count, context (conflicting or original) and demonstrations are drawn at random,
    demonstrations from ``items`` only (never the test question). With ``with_answer`` the
    text continues with the answer the demonstrations teach and a blank line.
    """
    rng = random.Random(f"prompts:{seed}")
    kinds = list(PROMPT_KIND_WEIGHTS)
    weights = list(PROMPT_KIND_WEIGHTS.values())
    order = list(items)
    while True:
        rng.shuffle(order)
        for item in order:
            kind = rng.choices(kinds, weights)[0]
            shots = rng.choice(CLOSED_SHOTS if kind == "closed" else CONFLICT_SHOTS)
            shots = min(shots, len(items) - 1)
            demos = sample_demonstrations(items, shots, rng.randrange(2**31), exclude=item)
            if kind == "closed":
                context = "none"
                text = closed_book_prompt(item, demos)
            else:
                context = "org" if rng.random() < ORG_CONTEXT_SHARE else "sub"
                text = conflict_prompt(item, demos, kind, context=context)  # type: ignore[arg-type]
            if with_answer:
                text += f" {_answer_taught(item, kind, context)}\n\n"
            yield kind, text


def tokenize_text(model, text: str) -> list[int]:
    """Token ids of ``text`` the way the model's prompts are tokenized (BOS if it uses one)."""
    tok = model.tokenizer
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if model.cfg.default_prepend_bos and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return ids


def pack_prompt_aligned(token_lists: Iterator[list[int]], context_size: int, n_rows: int):
    """Pack prompts into ``n_rows`` rows of ``context_size`` tokens, each row starting at a
    prompt start; the prompt that overflows a row is cut there (its tail is dropped)."""
    rows: list[list[int]] = []
    current: list[int] = []
    for ids in token_lists:
        current.extend(ids)
        if len(current) >= context_size:
            rows.append(current[:context_size])
            current = []
            if len(rows) == n_rows:
                break
    return rows


@dataclass
class TrainingText:
    """Packed token rows for SAELens plus a summary of what went into them."""

    rows: list[list[int]]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dataset(self):
        """A ``datasets.Dataset`` with an ``input_ids`` column (SAELens's pretokenized form)."""
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.rows})


def build_training_text(
    model, items: Sequence[ConflictItem], cfg: SAETrainingConfig, n_tokens: int
):
    """Enough prompt-aligned rows of ``cfg.context_size`` tokens to give ``n_tokens``
    training positions (positions before ``cfg.skip_first_positions`` do not count)."""
    per_row = cfg.context_size - cfg.skip_first_positions
    n_rows = math.ceil(n_tokens / per_row)
    kinds: Counter[str] = Counter()
    n_prompts = 0

    def stream() -> Iterator[list[int]]:
        nonlocal n_prompts
        for kind, text in prompt_texts(items, cfg.seed):
            kinds[kind] += 1
            n_prompts += 1
            yield tokenize_text(model, text)

    rows = pack_prompt_aligned(stream(), cfg.context_size, n_rows)
    summary = {
        "source": "SpARE-format prompts (+ taught answer) over the training questions",
        "n_rows": len(rows),
        "context_size": cfg.context_size,
        "n_prompts": n_prompts,
        "prompt_kinds": dict(sorted(kinds.items())),
        "conflict_shots": list(CONFLICT_SHOTS),
        "closed_book_shots": list(CLOSED_SHOTS),
        "org_context_share": ORG_CONTEXT_SHARE,
        "packing": "prompt-aligned rows (each row starts at a prompt start; overflow dropped)",
    }
    return TrainingText(rows=rows, summary=summary)


def heldout_token_sequences(
    model, items: Sequence[ConflictItem], n_prompts: int, seed: int, max_len: int | None = None
) -> list[list[int]]:
    """``n_prompts`` single prompts (with their taught answer) over held-out ``items``."""
    stream = prompt_texts(items, seed=seed + 1_000_003)
    out = []
    for _ in range(n_prompts):
        _, text = next(stream)
        ids = tokenize_text(model, text.rstrip("\n"))
        out.append(ids[:max_len] if max_len else ids)
    return out
