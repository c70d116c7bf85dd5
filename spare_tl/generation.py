"""Batched greedy generation (left padding, KV cache) and teacher-forced answer NLL.

Prompts are sorted by length so batches carry little padding, then results are put back in
the input order. Generation stops for a row at its first newline; the whole batch stops
when every row has produced one (or after ``max_new_tokens``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context window."""


@lru_cache(maxsize=8)
def _newline_ids(tokenizer) -> tuple[int, ...]:
    ids = []
    for token, idx in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if "\n" in text:
            ids.append(idx)
    return tuple(sorted(ids))


def newline_token_ids(model) -> list[int]:
    """Vocabulary ids whose text contains a newline (generation stops on any of them)."""
    return list(_newline_ids(model.tokenizer))


def _tokenize(model, prompts: Sequence[str]) -> list[list[int]]:
    bos = model.cfg.default_prepend_bos
    out = []
    for prompt in prompts:
        ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if bos and model.tokenizer.bos_token_id is not None:
            ids = [model.tokenizer.bos_token_id, *ids]
        out.append(ids)
    return out


def left_pad(model, token_lists: Sequence[Sequence[int]], extra: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into ``[batch, pos]`` plus the attention mask.

    Raises :class:`PromptTooLongError` when a row plus ``extra`` new tokens exceeds n_ctx.
    """
    longest = max(len(t) for t in token_lists)
    if longest + extra > model.cfg.n_ctx:
        raise PromptTooLongError(
            f"a prompt of {longest} tokens (+{extra} to generate) exceeds the context window "
            f"of {model.cfg.n_ctx} tokens; use fewer demonstrations/shorter contexts, or load "
            f"the model with a larger n_ctx"
        )
    pad = model.tokenizer.pad_token_id
    if pad is None:
        pad = model.tokenizer.eos_token_id or 0
    tokens = torch.full((len(token_lists), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(token_lists), longest), dtype=torch.long)
    for i, ids in enumerate(token_lists):
        if len(ids):
            tokens[i, longest - len(ids) :] = torch.tensor(ids)
            mask[i, longest - len(ids) :] = 1
    return tokens.to(model.cfg.device), mask.to(model.cfg.device)


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    stop_at_newline: bool = True,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of ``prompts``, cut at the first newline and stripped."""
    if not prompts:
        return []
    token_lists = _tokenize(model, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(token_lists[i]))
    eos = newline_token_ids(model) if stop_at_newline else []
    if model.tokenizer.eos_token_id is not None:
        eos = [*eos, model.tokenizer.eos_token_id]
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for batch in _batches(order, batch_size):
        tokens, _ = left_pad(model, [token_lists[i] for i in batch], extra=max_new_tokens)
        out = model.generate(
            tokens,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_at_eos=bool(eos),
            eos_token_id=eos or None,
            padding_side="left",
            prepend_bos=False,
            verbose=False,
            return_type="tokens",
        )
        new = out[:, tokens.shape[1] :]
        for row, i in enumerate(batch):
            text = model.tokenizer.decode(new[row], skip_special_tokens=True)
            outputs[i] = text.split("\n")[0].strip() if stop_at_newline else text
        bar.update(len(batch))
    bar.close()
    return outputs


@torch.no_grad()
def answer_nll(
    model,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[Tensor, " n"]:
    """Mean teacher-forced negative log-likelihood of each answer's tokens after its prompt.

    The answer is appended with a leading space (``"answer: Paris"``). This is the cleaner
    version of the paper's confidence signal (its code uses the loss of prompt + answer).
    """
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers must have the same length")
    prompt_ids = _tokenize(model, prompts)
    answer_ids = [
        model.tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"] for a in answers
    ]
    rows = [p + a for p, a in zip(prompt_ids, answer_ids)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    result = torch.zeros(len(rows), dtype=torch.float64)
    for batch in tqdm(
        list(_batches(order, batch_size)), desc="answer NLL", disable=not progress, leave=False
    ):
        tokens, mask = left_pad(model, [rows[i] for i in batch])
        logits = model(tokens, attention_mask=mask, padding_side="left")
        logprobs = logits.float().log_softmax(-1)
        for row, i in enumerate(batch):
            n = len(answer_ids[i])
            end = tokens.shape[1]
            targets = tokens[row, end - n :]
            lp = logprobs[row, end - n - 1 : end - 1].gather(-1, targets[:, None])
            result[i] = -lp.mean().double()
    return result
