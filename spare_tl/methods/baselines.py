"""The baselines' steering methods, each a :class:`~spare_tl.methods.base.SteeringMethod`
that answers conflict :class:`~spare_tl.data.prompts.Questions` in SpARE's harness:

- ``icl``: in-context learning, ``dss`` demonstrations to steer to context and ``dso`` to
  steer to memory (the same sampled demonstration questions; not an inference-time method).
- ``actadd``: mean difference of the two behaviour groups' last-position residuals
  (μ_C − μ_M from the grouped prompts SpARE uses, unweighted), added with a coefficient at the
  last prompt position of each chosen layer (minus it to steer to memory).
- ``taskvec`` (Hendel et al. 2023): the mean last-position residual at one layer of
  ``n_prompts`` ICL prompts built on the pool (``dss`` to context, ``dso`` to memory; 3
  demonstrations from the rest of the pool) replaces the test prompt's last-position
  residual at that layer.
- ``cad`` (context-aware decoding, Shi et al. 2024): greedy decoding on
  (1 + α)·log p(y | context, x) − α·log p(y | x), α > 0 to context and α < 0 to memory; the
  context-free prompt is the same prompt with the test item's context line removed (the
  demonstrations stay). Two KV caches per batch.

The hook-style methods edit the last prompt position once before decoding
(:class:`spare_tl.methods.hooks.LastPromptPositionHook`), like SpARE, so they cost no extra
forward pass per generated token; CAD costs one. :class:`PerDirection` joins two settings of
one method (each direction's dev-best). The pure parts of fitting the vectors live here
(:func:`mean_difference`, :func:`task_vector_prompts`); running the model for them is
:mod:`spare_tl.studies.baseline_setup`'s.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Unpack

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl.data.prompts import Questions, conflict_prompt, sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.generation import (
    Decoding,
    DecodingOptions,
    PromptPrefix,
    _batches,
    _decode_text,
    _greedy_steps,
    _last_logits,
    _tokenize,
    left_pad,
    stop_token_ids,
)
from spare_tl.kv_cache import stack_caches
from spare_tl.methods.base import PromptMethod, SteeringMethod
from spare_tl.methods.hooks import (
    Direction,
    LastPromptPositionHook,
    attach_hooks,
    resid_post_hook_name,
)
from spare_tl.methods.hooks import check_direction as _check_direction
from spare_tl.saes import DEFAULT_SITE, check_site, site_hook_name

__all__ = [
    "CAD",
    "ClosedBook",
    "ICL",
    "TASK_VECTOR_PROMPTS",
    "ActAdd",
    "PerDirection",
    "TaskVector",
    "add_vector",
    "cad_generate",
    "closed_book_prompts",
    "contrastive_scores",
    "mean_difference",
    "prompt_without_context",
    "replace_with",
    "task_vector_prompts",
]

TASK_VECTOR_PROMPTS = 16


class ICL(PromptMethod):
    """In-context learning: the same demonstration questions shown as ``dss`` (to context)
    or ``dso`` (to memory). Not an inference-time intervention; reported as the paper does."""

    name = "icl"
    inference_time = False
    DEMO_TYPE: ClassVar[dict[str, str]] = {"context": "dss", "memory": "dso"}

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        return {"demo_type": self.DEMO_TYPE[direction]}

    def prompts(self, questions: Questions, direction: Direction | None) -> list[str]:
        return questions.prompts(None if direction is None else self.DEMO_TYPE[direction])

    def edits(self, direction: Direction | None) -> bool:
        return False


class _HookMethod(PromptMethod):
    """A method that adds ``(hook_name, hook)`` pairs for the duration of generation."""

    def hooks(self, model, direction: Direction) -> list[tuple[str, Callable[..., Any]]]:
        raise NotImplementedError

    def steering(self, model, direction: Direction) -> AbstractContextManager[Any]:
        return attach_hooks(model, self.hooks(model, direction))


def _check_layer(model, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is outside the model's {model.cfg.n_layers} layers")


def _check_vector(model, vector: Tensor, what: str) -> None:
    if vector.shape != (model.cfg.d_model,):
        raise ValueError(f"{what} has shape {tuple(vector.shape)}, not ({model.cfg.d_model},)")


def add_vector(
    vector: Float[Tensor, " d_model"],
) -> Callable[[Float[Tensor, "batch d_model"]], Float[Tensor, "batch d_model"]]:
    """The pure edit h ↦ h + v (ActAdd)."""
    return lambda resid: resid + vector.to(device=resid.device, dtype=resid.dtype)


def replace_with(
    vector: Float[Tensor, " d_model"],
) -> Callable[[Float[Tensor, "batch d_model"]], Float[Tensor, "batch d_model"]]:
    """The pure edit h ↦ v (a task-vector patch)."""
    return lambda resid: vector.to(device=resid.device, dtype=resid.dtype).expand_as(resid)


@dataclass
class ActAdd(_HookMethod):
    """Add ``± coefficient · (μ_C − μ_M)`` at the last prompt position of each layer's
    ``site`` (the residual by default, or the attention / MLP output, as SpARE's edit).

    ``vectors[layer]`` is μ_C − μ_M at that site (see :func:`mean_difference`); to context the
    vector is added, to memory subtracted. Coefficient 0 adds no hook at all.
    """

    vectors: Mapping[int, Float[Tensor, " d_model"]]
    layers: tuple[int, ...]
    coefficient: float
    site: str = DEFAULT_SITE
    name: ClassVar[str] = "actadd"

    def __post_init__(self) -> None:
        check_site(self.site)
        self.layers = tuple(sorted(int(layer) for layer in self.layers))
        missing = [layer for layer in self.layers if layer not in self.vectors]
        if missing or not self.layers:
            raise ValueError(f"no mean-difference vector for layer(s) {missing or '(none given)'}")
        if not math.isfinite(self.coefficient):
            raise ValueError(f"coefficient must be finite, got {self.coefficient}")

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        hp: dict[str, Any] = {"layers": list(self.layers), "coefficient": self.coefficient}
        return hp | ({"site": self.site} if self.site != DEFAULT_SITE else {})

    def hooks(self, model, direction: Direction) -> list[tuple[str, Callable[..., Any]]]:
        if self.coefficient == 0:
            return []
        sign = 1.0 if direction == "context" else -1.0
        out = []
        for layer in self.layers:
            _check_layer(model, layer)
            _check_vector(model, self.vectors[layer], f"the layer-{layer} vector")
            delta = sign * self.coefficient * self.vectors[layer].float()
            hook = site_hook_name(layer, self.site)
            out.append((hook, LastPromptPositionHook(add_vector(delta))))
        return out


@dataclass
class TaskVector(_HookMethod):
    """Patch the task vector of ``direction`` into the last prompt position at ``layer``."""

    vectors: Mapping[str, Float[Tensor, " d_model"]]  # by direction, at `layer`
    layer: int
    n_prompts: int = TASK_VECTOR_PROMPTS
    name: ClassVar[str] = "taskvec"

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        return {"layer": self.layer, "n_prompts": self.n_prompts}

    def hooks(self, model, direction: Direction) -> list[tuple[str, Callable[..., Any]]]:
        _check_layer(model, self.layer)
        vector = self.vectors[direction]
        _check_vector(model, vector, f"the {direction} task vector")
        return [(resid_post_hook_name(self.layer), LastPromptPositionHook(replace_with(vector)))]


def prompt_without_context(
    item: ConflictItem, demonstrations: Sequence[ConflictItem], demo_type: str
) -> str:
    """The evaluation prompt with the test item's ``context:`` line removed."""
    full = conflict_prompt(item, demonstrations, demo_type)
    line = f"context: {item.sub_context}\n"
    cut = full.rindex(line)
    return full[:cut] + full[cut + len(line) :]


class ClosedBook(PromptMethod):
    """The reference with the test item's context removed (its demonstrations kept): the
    answer from memory alone in this prompt format. Both directions answer the same
    context-free prompt; CAD at α = −1 decodes exactly this (its (1 + α)·log p(y | c, x)
    term vanishes). Not a steering method: a row that says what "to memory" can reach
    without keeping the context."""

    name = "closed_book"
    inference_time = False

    def prompts(self, questions: Questions, direction: Direction | None) -> list[str]:
        return questions.prompts() if direction is None else closed_book_prompts(questions)

    def edits(self, direction: Direction | None) -> bool:
        return False


def closed_book_prompts(questions: Questions) -> list[str]:
    """Every question's prompt without its ``context:`` line (demonstrations kept)."""
    return [
        prompt_without_context(it, d, questions.demo_type)
        for it, d in zip(questions.items, questions.demonstrations)
    ]


def contrastive_scores(
    logits_with_context: Float[Tensor, "batch vocab"],
    logits_without_context: Float[Tensor, "batch vocab"],
    alpha: float,
) -> Float[Tensor, "batch vocab"]:
    """CAD's next-token scores, (1 + α)·log p(y|c, x) − α·log p(y|x) up to a per-row constant.

    Written as ``logits_c + α (log p_c − log p_n)``, so α = 0 gives exactly the plain logits
    (the same argmax as greedy decoding, tie for tie).
    """
    if alpha == 0:
        return logits_with_context
    lp_c = logits_with_context.float().log_softmax(-1)
    lp_n = logits_without_context.float().log_softmax(-1)
    return logits_with_context.float() + alpha * (lp_c - lp_n)


@torch.no_grad()
def cad_generate(
    model,
    prompts: Sequence[str],
    prompts_without_context: Sequence[str],
    alpha: float,
    *,
    shared_demonstrations: bool = True,
    decoding: Decoding | None = None,
    seconds: dict[str, float] | None = None,
    **options: Unpack[DecodingOptions],
) -> list[str]:
    """Greedy context-aware decoding, batched like :func:`spare_tl.generation.greedy_generate`.

    The token prefix both prompt versions share (one demonstration set per seed) is run once
    (:class:`~spare_tl.generation.PromptPrefix`); each batch then runs each version's own
    tokens, and the two KV caches are stacked so that every decoding step is one forward of
    both versions (the chosen token fed to both). Rows stop at their first newline and are
    dropped from the batch as they finish; the answers of several batches decode together,
    up to ``decoding.decode_rows`` rows (both versions) per forward. ``seconds`` (optional)
    accumulates ``"prompt"`` and ``"decode"`` wall time.
    """
    if len(prompts) != len(prompts_without_context):
        raise ValueError("give one context-free prompt per prompt")
    if not math.isfinite(alpha):
        raise ValueError(f"α must be finite, got {alpha}")
    dec = Decoding.of(decoding, options, desc="CAD")
    if not prompts:
        return []
    full = (_tokenize(model, prompts), _tokenize(model, prompts_without_context))
    # the versions differ only after the demonstrations: one prefix serves both
    prefix = PromptPrefix.of(model, [*full[0], *full[1]], enabled=shared_demonstrations)
    versions = (prefix.own(full[0]), prefix.own(full[1]))
    order = sorted(range(len(prompts)), key=lambda i: len(versions[0][i]))
    stop_ids = stop_token_ids(model, dec.stop_at_newline)
    timer = seconds if seconds is not None else {}
    outputs = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=dec.desc, disable=not dec.progress, leave=False)
    # answers waiting to be decoded: their rows, and per version their logits and caches
    rows: list[int] = []
    waiting: tuple[list[Tensor], list[Tensor]] = ([], [])
    caches: tuple[list[Any], list[Any]] = ([], [])

    def decode_waiting() -> None:
        start = time.perf_counter()
        new = _greedy_steps(
            model,
            torch.cat([*waiting[0], *waiting[1]]),
            stack_caches(model, [*caches[0], *caches[1]]),
            stop_ids,
            dec.max_new_tokens,
            compact=True,
            copies=2,
            pick=lambda both: contrastive_scores(*both.chunk(2), alpha).argmax(-1),
        )
        timer["decode"] = timer.get("decode", 0.0) + time.perf_counter() - start
        for r, i in enumerate(rows):
            outputs[i] = _decode_text(model, new[r], stop_ids, dec.stop_at_newline)
        bar.update(len(rows))
        rows.clear()
        for part in (*waiting, *caches):
            part.clear()

    for batch in _batches(order, dec.batch_size):
        if rows and 2 * (len(rows) + len(batch)) > dec.decode_rows:
            decode_waiting()
        start = time.perf_counter()
        for v, token_lists in enumerate(versions):
            tokens, mask = left_pad(
                model,
                [token_lists[i] for i in batch],
                extra=dec.max_new_tokens + 8 + prefix.length,
            )
            kv = prefix.cache(model, len(batch))
            resid = model(
                tokens, attention_mask=mask, past_kv_cache=kv, stop_at_layer=model.cfg.n_layers
            )
            waiting[v].append(_last_logits(model, resid[:, -1]))
            caches[v].append(kv)
        rows.extend(batch)
        timer["prompt"] = timer.get("prompt", 0.0) + time.perf_counter() - start
    if rows:
        decode_waiting()
    bar.close()
    return outputs


@dataclass
class CAD(PromptMethod):
    """Context-aware decoding with strength ``alpha`` >= 0 (+α to context, −α to memory).

    At signed α = −1 the (1 + α)·log p(y | c, x) term vanishes and CAD *is* greedy decoding
    of the context-free prompt, so that direction runs only that prompt (and at α = 0 only
    the prompt with context): :meth:`edits` is False, and the harness shares the prompt pass
    with any condition answering the same prompts, such as the closed-book row. Tested equal
    to the two-pass decoding.
    """

    alpha: float
    name: ClassVar[str] = "cad"
    extra_forward_passes_per_token: ClassVar[float] = 1.0
    shares_prefix: ClassVar[bool] = False  # a second, context-free prompt pass of its own

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(
                f"CAD strength must be finite and >= 0 (sign by direction), got {self.alpha}"
            )

    def signed_alpha(self, direction: Direction) -> float:
        return self.alpha if direction == "context" else -self.alpha

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        return {"alpha": self.signed_alpha(direction)}

    def edits(self, direction: Direction | None) -> bool:
        return direction is not None and self.signed_alpha(direction) not in (0.0, -1.0)

    def prompts(self, questions: Questions, direction: Direction | None) -> list[str]:
        """The prompts decoded greedily: the context-free ones where CAD reduces to them."""
        if direction is not None and self.signed_alpha(direction) == -1.0:
            return closed_book_prompts(questions)
        return questions.prompts()

    def decode(
        self, model, questions: Questions, direction: Direction, decoding: Decoding
    ) -> list[str]:
        """Context-aware decoding of the questions with α signed by ``direction`` (greedy
        decoding of :meth:`prompts` where CAD reduces to it: α = 0 or −1)."""
        if not self.edits(direction):
            return super().decode(model, questions, direction, decoding)
        return cad_generate(
            model,
            questions.prompts(),
            closed_book_prompts(questions),
            self.signed_alpha(direction),
            decoding=decoding,
        )


@dataclass
class PerDirection:
    """One method per direction (each direction's dev-best setting), as one method."""

    context: SteeringMethod
    memory: SteeringMethod

    def __post_init__(self) -> None:
        if self.context.name != self.memory.name:
            raise ValueError(f"two different methods: {self.context.name} / {self.memory.name}")

    @property
    def name(self) -> str:
        return self.context.name

    @property
    def extra_forward_passes_per_token(self) -> float:
        return max(
            self.context.extra_forward_passes_per_token, self.memory.extra_forward_passes_per_token
        )

    @property
    def inference_time(self) -> bool:
        return self.context.inference_time and self.memory.inference_time

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        return getattr(self, _check_direction(direction)).hyperparameters(direction)

    @property
    def shares_prefix(self) -> bool:
        return self.context.shares_prefix and self.memory.shares_prefix

    def edits(self, direction: Direction | None) -> bool:
        if direction is None:
            return False
        edits = getattr(self._for(direction), "edits", None)
        return True if edits is None else bool(edits(direction))

    def _for(self, direction: Direction | None) -> SteeringMethod:
        return self.context if direction in (None, "context") else self.memory

    def prompts(self, questions: Questions, direction: Direction | None) -> list[str]:
        return self._for(direction).prompts(questions, direction)

    def steering(self, model, direction: Direction) -> AbstractContextManager[Any]:
        return self._for(direction).steering(model, direction)

    def answer(
        self, model, questions: Questions, direction: Direction | None, decoding: Decoding | None
    ) -> list[str]:
        return self._for(direction).answer(model, questions, direction, decoding)


# ---------------------------------------------------------------------------------------
# The pure parts of the steering vectors (the model runs: spare_tl.studies.baseline_setup)
# ---------------------------------------------------------------------------------------


def mean_difference(
    resid: Mapping[int, Float[Tensor, "n d_model"]], labels: Tensor
) -> dict[int, Float[Tensor, " d_model"]]:
    """μ_C − μ_M per layer: mean residual of the use-context rows (label 1) minus that of
    the use-memory rows (label 0), unweighted."""
    labels = torch.as_tensor(labels)
    ctx, mem = labels == 1, labels == 0
    if not ctx.any() or not mem.any():
        raise ValueError("mean difference needs at least one use-context and one use-memory row")
    return {
        layer: (r[ctx].double().mean(0) - r[mem].double().mean(0)).float()
        for layer, r in resid.items()
    }


def task_vector_prompts(
    pool: Sequence[ConflictItem],
    demo_type: str,
    *,
    n_prompts: int = TASK_VECTOR_PROMPTS,
    n_shots: int = 3,
    seed: int = 0,
) -> list[str]:
    """ICL prompts on ``n_prompts`` pool questions (seeded), demonstrations from the rest."""
    rng = random.Random(seed)
    queries = rng.sample(list(pool), min(n_prompts, len(pool)))
    return [
        conflict_prompt(
            q, sample_demonstrations(pool, n_shots, seed * 7919 + i, exclude=q), demo_type
        )
        for i, q in enumerate(queries)
    ]
