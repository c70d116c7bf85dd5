"""Batched greedy generation (left padding, KV cache) and teacher-forced answer NLL.

Prompts are sorted by length so batches carry little padding, then results are put back in
the input order. Generation stops for a row at its first newline; the whole batch stops
when every row has produced one (or after ``max_new_tokens``).
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any, TypedDict, Unpack

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl.errors import PromptTooLongError
from spare_tl.kv_cache import expand_cache, select_rows, stack_caches

logger = logging.getLogger(__name__)


class DecodingOptions(TypedDict, total=False):
    """The keyword form of :class:`Decoding` (``greedy_generate(..., batch_size=8)``)."""

    max_new_tokens: int
    batch_size: int
    stop_at_newline: bool
    progress: bool
    desc: str
    decode_rows: int


@dataclass(frozen=True)
class Decoding:
    """How greedy answers are decoded: length, batch size, the newline stop, the progress bar.

    Every function that generates takes ``decoding=Decoding(...)`` or the same fields as
    keywords (:class:`DecodingOptions`); keywords override the object's fields.
    """

    max_new_tokens: int = 12
    batch_size: int = 16
    stop_at_newline: bool = True
    progress: bool = True
    desc: str = "generating"
    #: rows decoded together when several conditions share a prompt pass (a batch's rows
    #: under as many conditions as fit): one forward steps them all, which on a CPU costs
    #: little more than one condition's (a decoding step reads every weight once)
    decode_rows: int = 128

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "decode_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def of(cls, decoding: Decoding | None, options: Mapping[str, Any], **defaults: Any) -> Decoding:
        """``decoding`` (or ``cls(**defaults)`` when None) with the keyword ``options`` applied."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown decoding options {unknown}; known: {sorted(known)}")
        base = decoding if decoding is not None else cls(**defaults)
        return replace(base, **options) if options else base

    def labelled(self, desc: str) -> Decoding:
        """The same decoding under another progress-bar label."""
        return replace(self, desc=desc)


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


#: Shortest common token prefix worth computing once (the paper's protocol shows one
#: demonstration set per seed, so a seed's prompts share ~100 tokens; per-item sampling
#: shares only BOS and a word or two).
MIN_SHARED_PREFIX = 16


@dataclass
class PromptPrefix:
    """The token prefix every prompt of a call shares, run once: its batch-1 KV cache.

    ``length`` tokens of every prompt (never the last one) are covered; rows start from
    :meth:`cache` and run only their own tokens. The tokens are the full prompts' own, so
    the rows see exactly the tokens of a full pass (tokenising the prefix apart can merge
    differently at the boundary)."""

    length: int
    kv: Any = None

    @classmethod
    def of(cls, model, token_lists: Sequence[Sequence[int]], enabled: bool = True) -> PromptPrefix:
        """Find the shared prefix of ``token_lists`` and run it (empty when shorter than
        :data:`MIN_SHARED_PREFIX`, when ``enabled`` is False, or for a single prompt)."""
        from os.path import commonprefix

        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        if not enabled or len(token_lists) < 2:
            return cls(0)
        shared = len(commonprefix([list(t) for t in token_lists]))
        shared = min(shared, min(len(t) for t in token_lists) - 1)  # each row keeps its last
        if shared < MIN_SHARED_PREFIX:
            return cls(0)
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        tokens = torch.tensor([list(token_lists[0][:shared])], device=model.cfg.device)
        model(
            tokens,
            attention_mask=torch.ones_like(tokens),
            past_kv_cache=kv,
            stop_at_layer=model.cfg.n_layers,
        )
        return cls(shared, kv)

    def own(self, token_lists: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each prompt's tokens after the shared prefix."""
        return [list(t[self.length :]) for t in token_lists]

    def cache(self, model, batch: int):
        """A fresh batch-``batch`` KV cache holding the prefix (empty without one)."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        if self.kv is None:
            return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
        return expand_cache(self.kv, batch)


def _last_logits(model, resid: Tensor) -> Tensor:
    """Logits from final residuals (ln_final + unembed), only where they are needed."""
    return model.unembed(model.ln_final(resid)).float()


def stop_token_ids(model, stop_at_newline: bool = True) -> Tensor:
    """Token ids that end a row's answer: any newline-bearing token (optional) and EOS."""
    stop = set(newline_token_ids(model)) if stop_at_newline else set()
    if model.tokenizer.eos_token_id is not None:
        stop.add(model.tokenizer.eos_token_id)
    return torch.tensor(sorted(stop), dtype=torch.long, device=model.cfg.device)


def _greedy_steps(
    model,
    logits: Tensor,
    kv,
    stop_ids: Tensor,
    max_new_tokens: int,
    *,
    compact: bool = False,
    copies: int = 1,
    pick: Callable[[Tensor], Tensor] | None = None,
) -> Int[Tensor, "batch new"]:
    """Greedy tokens from the first next-token ``logits`` on, one cached step at a time,
    until every row has produced a stop token or ``max_new_tokens`` are reached.

    With ``compact``, rows that have finished are dropped from the batch (and their KV
    cache) once a quarter of the running rows have finished, so a few long answers do not
    keep the whole batch decoding; their remaining places hold their stop token. Only for
    forwards without position-tracking hooks (the batch size changes).

    With ``copies`` > 1 every answer has that many rows, stacked as blocks ([copy 1 of each
    answer; copy 2 of each; ...], CAD's two prompt versions); ``pick`` turns the logits of all
    blocks into one next token per answer (default: the argmax), which every copy is fed."""
    if pick is None:
        if copies != 1:
            raise ValueError("rows in several copies need a pick function")
        pick = lambda scores: scores.argmax(-1)  # noqa: E731
    b = logits.shape[0] // copies
    device = logits.device
    out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
    running = torch.arange(b, device=device)  # answers (rows of `out`) still in the batch
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # over the current batch
    steps = 0
    for step in range(max_new_tokens):
        nxt = pick(logits)
        out[running, step] = nxt
        steps = step + 1
        finished |= torch.isin(nxt, stop_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if compact and int(finished.sum()) * 4 >= len(running):
            keep = torch.nonzero(~finished).squeeze(1)
            done = running[finished]
            out[done, step + 1 :] = out[done, step : step + 1]
            rows = torch.cat([keep + c * len(running) for c in range(copies)])
            running, nxt, kv = running[keep], nxt[keep], select_rows(kv, rows)
            finished = torch.zeros(len(running), dtype=torch.bool, device=device)
        fed = nxt.repeat(copies)[:, None]
        resid = model(
            fed,
            attention_mask=torch.ones_like(fed),
            past_kv_cache=kv,
            stop_at_layer=model.cfg.n_layers,
        )
        logits = _last_logits(model, resid[:, -1])
    return out[:, :steps]


def _answer_lengths(new: Int[Tensor, "batch new"], stop_ids: Tensor) -> Int[Tensor, " batch"]:
    """Tokens each row generated: up to and including its first stop token."""
    stopped = torch.isin(new, stop_ids)
    first = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1])
    return first


def _decode_text(model, new_tokens: Tensor, stop_ids: Tensor, stop_at_newline: bool) -> str:
    """The answer text: tokens up to the first stop token (kept, so a token with text
    before its newline counts), cut at the first newline."""
    stops = torch.nonzero(torch.isin(new_tokens, stop_ids))
    if len(stops):
        new_tokens = new_tokens[: int(stops[0]) + 1]
    text = model.tokenizer.decode(new_tokens, skip_special_tokens=True)
    return text.split("\n")[0].strip() if stop_at_newline else text


@torch.no_grad()
def generate_and_score(
    model,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]] | None = None,
    *,
    prefix: str | None = None,
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> tuple[list[str], Float[Tensor, "n n_answers"]]:
    """Greedy continuations and, optionally, the teacher-forced NLL of candidate answers.

    One prompt pass per batch fills the KV cache (left padding, logits only at the last
    position); each candidate answer is then scored from the frozen cache (a few tokens of
    work instead of a second prompt pass), and greedy decoding continues one token per step
    until every row has produced a newline or ``max_new_tokens`` are reached.

    With ``prefix``, every prompt is ``prefix + prompt``: the prefix (e.g. shared
    demonstrations) is run once and its KV cache reused by every row; prefix and prompt are
    tokenised separately.
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    dec = Decoding.of(decoding, options)
    n_answers = len(answers[0]) if answers else 0
    if answers is not None and len(answers) != len(prompts):
        raise ValueError("answers must hold one list of candidates per prompt")
    nll = torch.zeros(len(prompts), n_answers, dtype=torch.float64)
    if not prompts:
        return [], nll
    prefix_ids: list[int] = []
    if prefix:
        prefix_ids = _tokenize(model, [prefix])[0]
        token_lists = [model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    else:
        token_lists = _tokenize(model, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(token_lists[i]))
    prefix_kv = None
    if prefix_ids:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        prefix_kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        prefix_tokens = torch.tensor([prefix_ids], device=model.cfg.device)
        model(
            prefix_tokens,
            attention_mask=torch.ones_like(prefix_tokens),
            past_kv_cache=prefix_kv,
            stop_at_layer=model.cfg.n_layers,
        )
    stop_ids = stop_token_ids(model, dec.stop_at_newline)
    n_layers = model.cfg.n_layers
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=dec.desc, disable=not dec.progress, leave=False)
    for batch in _batches(order, dec.batch_size):
        b = len(batch)
        tokens, mask = left_pad(
            model, [token_lists[i] for i in batch], extra=dec.max_new_tokens + 8 + len(prefix_ids)
        )
        if prefix_kv is not None:
            kv = expand_cache(prefix_kv, b)
        else:
            kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, b)
        resid = model(tokens, attention_mask=mask, past_kv_cache=kv, stop_at_layer=n_layers)
        logits = _last_logits(model, resid[:, -1])
        if n_answers:
            first = logits.log_softmax(-1)
            kv.freeze()
            for a in range(n_answers):
                ids = [
                    model.tokenizer(" " + answers[i][a].strip(), add_special_tokens=False)[
                        "input_ids"
                    ]
                    for i in batch
                ]
                width = max(len(x) for x in ids)
                ans = torch.zeros(b, width, dtype=torch.long, device=tokens.device)
                ans_mask = torch.zeros(b, width, dtype=torch.long, device=tokens.device)
                for r, x in enumerate(ids):
                    ans[r, : len(x)] = torch.tensor(x)
                    ans_mask[r, : len(x)] = 1
                lp = first.gather(-1, ans[:, :1])[:, 0]  # the answer's first token
                total = lp.clone()
                if width > 1:
                    out = model(
                        ans[:, :-1],
                        attention_mask=ans_mask[:, :-1],
                        past_kv_cache=kv,
                        stop_at_layer=n_layers,
                    )
                    rest = (
                        _last_logits(model, out)
                        .log_softmax(-1)
                        .gather(-1, ans[:, 1:, None])[..., 0]
                    )
                    total = total + (rest * ans_mask[:, 1:]).sum(-1)
                for r, i in enumerate(batch):
                    nll[i, a] = -float(total[r]) / len(ids[r])
            kv.unfreeze()
        new = _greedy_steps(model, logits, kv, stop_ids, dec.max_new_tokens)
        for r, i in enumerate(batch):
            outputs[i] = _decode_text(model, new[r], stop_ids, dec.stop_at_newline)
        bar.update(b)
    bar.close()
    return outputs, nll


StartSteering = Callable[[list[int]], AbstractContextManager[Any]]


@torch.no_grad()
def generate_shared_prefix(
    model,
    prompts: Sequence[str],
    conditions: Mapping[str, StartSteering | None],
    *,
    seconds: dict[str, float] | None = None,
    shared_demonstrations: bool = True,
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> dict[str, list[str]]:
    """Greedy answers of the same ``prompts`` under several conditions, sharing the prompt.

    Every condition is either None (unsteered) or a callable that takes the batch's row
    indices (into ``prompts``, in batch order) and returns a fresh context manager adding
    hooks which change **only the last prompt position** (SpARE, ActAdd, task vectors, the
    conflict gate, a per-row donor patch). With causal attention every earlier position's keys and
    values are then the same in all conditions, so each batch runs the prompt without its
    last token once, and each condition runs only the last prompt token from a copy of that
    KV cache. Hooks see the last token as a one-position prompt pass; the steering context
    is entered anew for every batch, so hook state never leaks between batches, and left
    before decoding (the KV cache carries the edit). The conditions' caches are then stacked
    and decoded together, up to ``decoding.decode_rows`` rows per forward (rows of later
    batches join until the forward is full), dropping rows as they finish.

    When the prompts also share a token prefix (one demonstration set per seed), that
    prefix is run once for the whole call (:class:`PromptPrefix`) and every batch starts from
    its KV cache, running only each row's own tokens (``shared_demonstrations=False``: not).

    ``seconds`` (optional) accumulates wall time: ``"prefix"`` for the shared passes and one
    entry per condition for its own last-token pass and its share of the joint decoding (in
    proportion to the tokens its rows generated). Several prompt sets at once:
    :func:`generate_prompt_sets`.
    """
    return generate_prompt_sets(
        model,
        [(prompts, conditions)],
        seconds=seconds,
        shared_demonstrations=shared_demonstrations,
        decoding=decoding,
        **options,
    )


@dataclass
class _Pending:
    """One condition's rows of one batch, prompt done, waiting to be decoded."""

    name: str
    rows: list[int]
    logits: Tensor
    kv: Any


@torch.no_grad()
def generate_prompt_sets(
    model,
    sets: Sequence[tuple[Sequence[str], Mapping[str, StartSteering | None]]],
    *,
    seconds: dict[str, float] | None = None,
    set_seconds: list[float] | None = None,
    shared_demonstrations: bool = True,
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> dict[str, list[str]]:
    """:func:`generate_shared_prefix` for several prompt sets, each with its own conditions
    (unique names over all sets), decoded together: every set's prompts run as
    :func:`generate_shared_prefix` runs them (its own shared prefix, its own batches), and
    the rows of every set and condition fill the same decoding forwards. A row's answer does
    not depend on the rows beside it. ``set_seconds`` (optional, one float per set)
    accumulates each set's shared prompt passes."""
    dec = Decoding.of(decoding, options)
    names = [name for _, conditions in sets for name in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique over the prompt sets, got {names}")
    if set_seconds is not None and len(set_seconds) != len(sets):
        raise ValueError(f"give one set_seconds entry per prompt set ({len(sets)})")
    outputs = {name: [""] * len(prompts) for prompts, conditions in sets for name in conditions}
    timer = seconds if seconds is not None else {}
    per_set = set_seconds if set_seconds is not None else [0.0] * len(sets)
    stop_ids = stop_token_ids(model, dec.stop_at_newline)
    n_layers = model.cfg.n_layers
    total = sum(len(prompts) * len(conditions) for prompts, conditions in sets)
    bar = tqdm(total=total, desc=dec.desc, disable=not dec.progress, leave=False)
    pending: list[_Pending] = []

    def decode_pending() -> None:
        start = time.perf_counter()
        kv = pending[0].kv if len(pending) == 1 else stack_caches(model, [p.kv for p in pending])
        logits = torch.cat([p.logits for p in pending])
        new = _greedy_steps(model, logits, kv, stop_ids, dec.max_new_tokens, compact=True)
        # each condition's share of the joint decoding: its rows' generated tokens
        counts = _answer_lengths(new, stop_ids).double()
        sizes = [len(p.rows) for p in pending]
        tokens = [float(part.sum()) for part in counts.split(sizes)]
        elapsed = time.perf_counter() - start
        offset = 0
        for p, n_tokens in zip(pending, tokens):
            for r, i in enumerate(p.rows):
                outputs[p.name][i] = _decode_text(
                    model, new[offset + r], stop_ids, dec.stop_at_newline
                )
            offset += len(p.rows)
            timer[p.name] = timer.get(p.name, 0.0) + elapsed * n_tokens / max(sum(tokens), 1.0)
            bar.update(len(p.rows))
        pending.clear()

    for s, (prompts, conditions) in enumerate(sets):
        if not prompts or not conditions:
            continue
        start = time.perf_counter()
        full = _tokenize(model, prompts)
        prefix = PromptPrefix.of(model, full, enabled=shared_demonstrations)
        token_lists = prefix.own(full)
        spent = time.perf_counter() - start
        timer["prefix"] = timer.get("prefix", 0.0) + spent
        per_set[s] += spent
        order = sorted(range(len(prompts)), key=lambda i: len(token_lists[i]))
        for batch in _batches(order, dec.batch_size):
            b = len(batch)
            tokens, mask = left_pad(
                model, [token_lists[i] for i in batch], extra=dec.max_new_tokens + 8 + prefix.length
            )
            start = time.perf_counter()
            prefix_kv = prefix.cache(model, b)
            if tokens.shape[1] > 1:
                model(
                    tokens[:, :-1],
                    attention_mask=mask[:, :-1],
                    past_kv_cache=prefix_kv,
                    stop_at_layer=n_layers,
                )
            spent = time.perf_counter() - start
            timer["prefix"] = timer.get("prefix", 0.0) + spent
            per_set[s] += spent
            for name, start_steering in conditions.items():
                if pending and sum(len(p.rows) for p in pending) + b > dec.decode_rows:
                    decode_pending()
                start = time.perf_counter()
                kv = expand_cache(prefix_kv, b)
                with start_steering(batch) if start_steering is not None else nullcontext():
                    resid = model(
                        tokens[:, -1:],
                        attention_mask=mask[:, -1:],
                        past_kv_cache=kv,
                        stop_at_layer=n_layers,
                    )
                # the hooks are gone: they change only the last prompt position, which the
                # KV cache now carries, so the rows decode unhooked with any others
                pending.append(_Pending(name, list(batch), _last_logits(model, resid[:, -1]), kv))
                timer[name] = timer.get(name, 0.0) + time.perf_counter() - start
    if pending:
        decode_pending()
    bar.close()
    return outputs


def greedy_generate(
    model,
    prompts: Sequence[str],
    *,
    prefix: str | None = None,
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, KV cache), cut at the first newline.

    ``prefix`` (optional) is prepended to every prompt and computed once.
    """
    texts, _ = generate_and_score(
        model, prompts, None, prefix=prefix, decoding=Decoding.of(decoding, options)
    )
    return texts


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
