"""Baselines in SpARE's harness: the same prompts, demonstrations, decoding, exact match and
test questions, one interface, hyper-parameters chosen on the development set only.

Methods (``METHODS``), each a :class:`SteeringMethod` that answers ``(items, demonstrations,
direction)``:

- ``none``: no steering (the ``doo`` prompts of the evaluation).
- ``spare``: SpARE's edit (:func:`spare_tl.steering.steer`) with a saved feature set.
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
(:class:`spare_tl.steering.LastPromptPositionHook`), like SpARE, so they cost no extra
forward pass per generated token; CAD costs one.

    python -m spare_tl.baselines sweep --method actadd      # dev sweep -> baselines/sweep-actadd.json
    python -m spare_tl.baselines table                      # held-out table -> JSON (spare-tl docs)
    spare-tl evaluate --method cad --output cad.json        # one method, dev-best settings
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.data.prompts import conflict_prompt, sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.evaluation import (
    CONDITION_OF,  # noqa: F401  (re-exported)
    EvaluationConfig,
    EvaluationResult,
    evaluate,
    evaluation_demonstrations,
    saved_questions,
)
from spare_tl.generation import (
    _last_logits,
    _tokenize,
    left_pad,
    stop_token_ids,
)
from spare_tl.hardware import add_dtype_argument, load_steering_setup_for
from spare_tl.harness import (
    Condition,
    NoSteering,
    PromptMethod,
    SpareMethod,
    SteeringMethod,
    answer_conditions,
)
from spare_tl.harness import check_direction as _check_direction
from spare_tl.saes import DEFAULT_SITE, check_site, site_hook_name
from spare_tl.steering import (
    DIRECTIONS,
    Direction,
    LastPromptPositionHook,
    attach_hooks,
    resid_post_hook_name,
)
from spare_tl.sweep import MAX_NEITHER_RISE, answer_shares, best_settings, parse_layer_set

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("none", "spare", "icl", "actadd", "taskvec", "cad")
STAGE = "baselines"
DEFAULT_COEFFICIENTS = (0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0)
TASK_VECTOR_PROMPTS = 16


class ICL(PromptMethod):
    """In-context learning: the same demonstration questions shown as ``dss`` (to context)
    or ``dso`` (to memory). Not an inference-time intervention; reported as the paper does."""

    name = "icl"
    inference_time = False
    DEMO_TYPE: ClassVar[dict[str, str]] = {"context": "dss", "memory": "dso"}

    def hyperparameters(self, direction: Direction) -> dict[str, Any]:
        return {"demo_type": self.DEMO_TYPE[direction]}

    def prompts(self, items, demonstrations, direction, demo_type) -> list[str]:
        if direction is None:
            return super().prompts(items, demonstrations, None, demo_type)
        return super().prompts(items, demonstrations, None, self.DEMO_TYPE[direction])


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
    max_new_tokens: int = 12,
    batch_size: int = 16,
    stop_at_newline: bool = True,
    progress: bool = True,
    desc: str = "CAD",
) -> list[str]:
    """Greedy context-aware decoding, batched like :func:`spare_tl.generation.greedy_generate`.

    Each batch keeps two left-padded KV caches, one per prompt version; every step feeds the
    chosen token to both. Rows stop at their first newline.
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if len(prompts) != len(prompts_without_context):
        raise ValueError("give one context-free prompt per prompt")
    if not math.isfinite(alpha):
        raise ValueError(f"α must be finite, got {alpha}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    with_ctx = _tokenize(model, prompts)
    without = _tokenize(model, prompts_without_context)
    order = sorted(range(len(prompts)), key=lambda i: len(with_ctx[i]))
    stop_ids = stop_token_ids(model, stop_at_newline)
    n_layers = model.cfg.n_layers
    device = model.cfg.device
    outputs = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        b = len(batch)
        logits = []
        caches = []
        for token_lists in (with_ctx, without):
            tokens, mask = left_pad(
                model, [token_lists[i] for i in batch], extra=max_new_tokens + 8
            )
            kv = TransformerLensKeyValueCache.init_cache(model.cfg, device, b)
            resid = model(tokens, attention_mask=mask, past_kv_cache=kv, stop_at_layer=n_layers)
            logits.append(_last_logits(model, resid[:, -1]))
            caches.append(kv)
        generated = []
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        ones = torch.ones(b, 1, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            nxt = contrastive_scores(logits[0], logits[1], alpha).argmax(-1)
            generated.append(nxt)
            finished |= torch.isin(nxt, stop_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            for k, kv in enumerate(caches):
                resid = model(
                    nxt[:, None], attention_mask=ones, past_kv_cache=kv, stop_at_layer=n_layers
                )
                logits[k] = _last_logits(model, resid[:, -1])
        new = torch.stack(generated, 1)
        for r, i in enumerate(batch):
            text = model.tokenizer.decode(new[r], skip_special_tokens=True)
            outputs[i] = text.split("\n")[0].strip() if stop_at_newline else text
        bar.update(b)
    bar.close()
    return outputs


@dataclass
class CAD(PromptMethod):
    """Context-aware decoding with strength ``alpha`` >= 0 (+α to context, −α to memory)."""

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

    def answer(
        self,
        model,
        items: Sequence[ConflictItem],
        demonstrations: Sequence[Sequence[ConflictItem]],
        direction: Direction | None,
        *,
        demo_type: str = "doo",
        max_new_tokens: int = 12,
        batch_size: int = 16,
        progress: bool = False,
        desc: str = "generating",
    ) -> list[str]:
        if direction is None:
            return super().answer(
                model,
                items,
                demonstrations,
                None,
                demo_type=demo_type,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                desc=desc,
            )
        direction = _check_direction(direction)
        if len(items) != len(demonstrations):
            raise ValueError("give one list of demonstrations per item")
        return cad_generate(
            model,
            self.prompts(items, demonstrations, direction, demo_type),
            [prompt_without_context(it, d, demo_type) for it, d in zip(items, demonstrations)],
            self.signed_alpha(direction),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
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

    def _for(self, direction: Direction | None) -> SteeringMethod:
        return self.context if direction in (None, "context") else self.memory

    def prompts(self, items, demonstrations, direction, demo_type) -> list[str]:
        return self._for(direction).prompts(items, demonstrations, direction, demo_type)

    def steering(self, model, direction: Direction) -> AbstractContextManager[Any]:
        return self._for(direction).steering(model, direction)

    def answer(self, model, items, demonstrations, direction, **kwargs) -> list[str]:
        return self._for(direction).answer(model, items, demonstrations, direction, **kwargs)


# ---------------------------------------------------------------------------------------
# Steering vectors from the development set
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


def actadd_vectors(
    model,
    layers: Sequence[int],
    *,
    grouped=None,
    cache_root: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    site: str = DEFAULT_SITE,
) -> dict[int, Float[Tensor, " d_model"]]:
    """μ_C − μ_M at ``site`` of ``layers`` from SpARE's grouped prompts.

    Uses the cached activations (``cache_data/<model>/activations[_<site>]``) when they hold
    these layers and were made from ``grouped`` (or ``grouped`` is None); otherwise runs the
    kept grouped prompts (the cache is left as it is).
    """
    from spare_tl.activations import Activations, last_position_resid, stage_name
    from spare_tl.behaviours import require_groups

    layers = sorted({int(layer) for layer in layers})
    directory = cache.stage_dir(model.cfg.model_name, stage_name("activations", site), cache_root)
    expected = None
    if grouped is not None:
        prompts, labels, _ = grouped.labelled()
        expected = cache.fingerprint({"p": prompts, "l": labels.tolist()})
    if (directory / "config.json").exists():
        acts = Activations.load(directory)
        fresh = expected is None or acts.config.get("grouped_hash") == expected
        if fresh and all(layer in acts.resid for layer in layers):
            logger.info("ActAdd vectors from the cached activations in %s", directory)
            return mean_difference({layer: acts.resid[layer] for layer in layers}, acts.labels)
    if grouped is None:
        raise ValueError(
            f"no cached activations for layers {layers} in {directory} and no grouped prompts: "
            "run `spare-tl group CONFIG` (and `spare-tl activations CONFIG`) first"
        )
    require_groups(grouped)
    resid = last_position_resid(
        model, prompts, layers, site=site, batch_size=batch_size, progress=progress
    )
    return mean_difference(resid, labels)


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


def task_vectors(
    model,
    pool: Sequence[ConflictItem],
    layers: Sequence[int],
    *,
    n_prompts: int = TASK_VECTOR_PROMPTS,
    n_shots: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, dict[int, Float[Tensor, " d_model"]]]:
    """Per direction and layer, the mean last-position residual of ICL prompts with ``dss``
    (context) or ``dso`` (memory) demonstrations, over ``n_prompts`` pool questions.

    The mean over several prompts (instead of Hendel et al.'s single dummy query) keeps the
    task and averages the particular query away.
    """
    from spare_tl.activations import last_position_resid

    out: dict[str, dict[int, Tensor]] = {}
    for direction, demo_type in ICL.DEMO_TYPE.items():
        prompts = task_vector_prompts(
            pool, demo_type, n_prompts=n_prompts, n_shots=n_shots, seed=seed
        )
        resid = last_position_resid(
            model, prompts, layers, batch_size=batch_size, progress=progress
        )
        out[direction] = {layer: r.mean(0) for layer, r in resid.items()}
    return out


# ---------------------------------------------------------------------------------------
# Evaluation and development sweep
# ---------------------------------------------------------------------------------------


def evaluate_method(
    model,
    method: SteeringMethod,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    config: EvaluationConfig | None = None,
    dataset_name: str = "builtin",
    progress: bool = True,
    shared_no_steering: dict[int, tuple[list[str], float]] | None = None,
) -> EvaluationResult:
    """:func:`spare_tl.evaluation.evaluate` with ``method`` (the one evaluation harness)."""
    return evaluate(
        model,
        items,
        pool,
        method=method,
        config=config,
        dataset_name=dataset_name,
        progress=progress,
        shared_no_steering=shared_no_steering,
    )


def sweep_method(
    model,
    candidates: Sequence[SteeringMethod],
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    directions: Sequence[str] = DIRECTIONS,
    n_shots: int = 3,
    seed: int = 0,
    demo_type: str = "doo",
    max_new_tokens: int = 12,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """EM of every candidate setting in each direction on the development ``items`` with the
    test protocol (demonstrations from ``pool``), as :func:`spare_tl.sweep.sweep`: every
    (candidate, direction) is a condition of the one harness; the first record is no
    steering. Test questions are never looked at."""
    if not candidates:
        raise ValueError("no candidate settings to sweep")
    if not items:
        raise ValueError("the sweep needs at least one development question")
    names = {c.name for c in candidates}
    if len(names) != 1:
        raise ValueError(f"sweep one method at a time, got {sorted(names)}")
    name = names.pop()
    demos = evaluation_demonstrations(items, pool, n_shots, seed)
    grid = [(c, d) for c in candidates for d in directions]
    conditions = [Condition("none", NoSteering())] + [
        Condition(f"setting {i}", c, d)  # type: ignore[arg-type]
        for i, (c, d) in enumerate(grid)
    ]
    answers = answer_conditions(
        model,
        items,
        demos,
        conditions,
        demo_type=demo_type,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        desc=f"sweep {name}",
    )
    records: list[dict[str, Any]] = [
        {"method": name, "direction": "none", "hyperparameters": {}, "n": len(items)}
        | answer_shares(answers["none"], items)
    ]
    for i, (candidate, direction) in enumerate(grid):
        rec = {
            "method": name,
            "direction": direction,
            "hyperparameters": candidate.hyperparameters(direction),
            "n": len(items),
        } | answer_shares(answers[f"setting {i}"], items)
        logger.info("sweep %s", rec)
        records.append(rec)
    return records


def sweep_path(model_name: str, method: str, root: Path | None = None) -> Path:
    return cache.stage_dir(model_name, STAGE, root) / f"sweep-{method}.json"


def save_method_sweep(
    records: Sequence[dict[str, Any]], path: Path, config: dict[str, Any]
) -> None:
    """``{"config", "records", "best"}``; best: per direction, highest EM in that direction
    among the settings breaking at most ``config["max_neither_rise"]`` (default
    :data:`spare_tl.sweep.MAX_NEITHER_RISE`, as SpARE's sweep) more answers than no steering,
    then fewest broken answers (:func:`spare_tl.sweep.best_settings`)."""
    config = {"max_neither_rise": MAX_NEITHER_RISE, **config}
    best = best_settings(records, config["max_neither_rise"])
    cache.write_json(Path(path), {"config": config, "records": list(records), "best": best})


def best_hyperparameters(path: Path) -> dict[str, dict[str, Any]]:
    """Dev-best hyper-parameters per direction from a saved sweep."""
    path = Path(path)
    if not path.exists():
        method = path.stem.removeprefix("sweep-")
        raise FileNotFoundError(
            f"no development sweep at {path}: run `python -m spare_tl.baselines sweep "
            f"--method {method}` first (or pass the hyper-parameters)"
        )
    best = cache.read_json(path)["best"]
    return {d: best[d]["hyperparameters"] for d in DIRECTIONS if d in best}


# ---------------------------------------------------------------------------------------
# Building methods from hyper-parameters
# ---------------------------------------------------------------------------------------


@dataclass
class BaselineSetup:
    """Everything the methods are built from: model, SpARE's features and SAEs, the pool
    (development set) and the held-out items; steering vectors are computed on demand."""

    model: Any
    features: Any
    saes: Mapping[Any, Any]
    pool: list[ConflictItem]
    evaluation: list[ConflictItem]
    dataset: str = "builtin"
    grouped: Any = None
    cache_root: Path | None = None
    task_vector_prompts: int = TASK_VECTOR_PROMPTS
    progress: bool = True
    _actadd: dict[str, dict[int, Tensor]] = field(default_factory=dict, init=False, repr=False)
    _taskvec: dict[str, dict[int, Tensor]] = field(
        default_factory=lambda: {"context": {}, "memory": {}}, init=False, repr=False
    )

    @classmethod
    def load(
        cls,
        features_dir: str | Path | None = None,
        saes_dir: str | Path | None = None,
        dataset: str = "builtin",
        *,
        model=None,
        pool_size: int | None = None,
    ) -> BaselineSetup:
        """The embedded default (or the given features/SAEs) and its memorised pool split."""
        from spare_tl.embedded import (
            DEFAULT_FEATURES,
            DEFAULT_SAES,
            load_steering_setup,
            memorised_split,
        )

        model, features, saes = load_steering_setup(
            features_dir or DEFAULT_FEATURES, saes_dir or DEFAULT_SAES, model=model
        )
        if pool_size:
            features.metadata["pool_size"] = pool_size
        split = memorised_split(model, features, dataset)
        return cls(model, features, saes, list(split.pool), list(split.evaluation), dataset)

    def _grouped(self):
        if self.grouped is None:
            from spare_tl.behaviours import GroupedPrompts

            directory = cache.stage_dir(
                self.model.cfg.model_name, "grouped_prompts", self.cache_root
            )
            if (directory / "records.jsonl").exists():
                self.grouped = GroupedPrompts.load(directory)
        return self.grouped

    def actadd_vectors(self, layers: Iterable[int], site: str = DEFAULT_SITE) -> dict[int, Tensor]:
        have = self._actadd.setdefault(site, {})
        missing = sorted({int(layer) for layer in layers} - set(have))
        if missing:
            have.update(
                actadd_vectors(
                    self.model,
                    missing,
                    grouped=self._grouped(),
                    cache_root=self.cache_root,
                    progress=self.progress,
                    site=site,
                )
            )
        return have

    def task_vectors(self, layers: Iterable[int]) -> dict[str, dict[int, Tensor]]:
        missing = sorted({int(layer) for layer in layers} - set(self._taskvec["context"]))
        if missing:
            new = task_vectors(self.model, self.pool, missing, n_prompts=self.task_vector_prompts)
            for direction, per_layer in new.items():
                self._taskvec[direction].update(per_layer)
        return self._taskvec

    def make(self, name: str, hyperparameters: Mapping[str, Any] | None = None) -> SteeringMethod:
        """One method from one setting (the keys its :meth:`hyperparameters` reports)."""
        hp = dict(hyperparameters or {})
        if name == "none":
            return NoSteering()
        if name == "icl":
            return ICL()
        if name == "spare":
            return SpareMethod(self.features, self.saes, hp.get("edit_strength"))
        if name == "actadd":
            layers = tuple(hp.get("layers") or sorted(self.features.layers))
            site = hp.get("site", DEFAULT_SITE)
            return ActAdd(self.actadd_vectors(layers, site), layers, float(hp["coefficient"]), site)
        if name == "taskvec":
            layer = int(hp["layer"])
            vectors = self.task_vectors([layer])
            return TaskVector(
                {d: vectors[d][layer] for d in DIRECTIONS}, layer, self.task_vector_prompts
            )
        if name == "cad":
            return CAD(abs(float(hp["alpha"])))
        raise ValueError(f"unknown method {name!r}: use one of {METHODS}")

    def method(
        self,
        name: str,
        *,
        sweep: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> SteeringMethod:
        """``name`` with its dev-best setting per direction (from its saved sweep), or with
        ``overrides`` in both directions."""
        if name in ("none", "icl", "spare"):
            return self.make(name, overrides)
        if overrides:
            return self.make(name, overrides)
        best = best_hyperparameters(
            sweep or sweep_path(self.model.cfg.model_name, name, self.cache_root)
        )
        return PerDirection(self.make(name, best["context"]), self.make(name, best["memory"]))

    def grid(
        self,
        name: str,
        *,
        layer_sets: Sequence[Sequence[int] | tuple[str, Sequence[int]]] | None = None,
        coefficients: Sequence[float] = DEFAULT_COEFFICIENTS,
        layers: Sequence[int] | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
    ) -> list[SteeringMethod]:
        """Candidate settings of ``name`` for the development sweep."""
        if name == "actadd":
            sets = [_site_set(s) for s in layer_sets or [sorted(self.features.layers)]]
            return [
                self.make(name, {"layers": list(ls), "coefficient": c, "site": site})
                for (site, ls), c in itertools.product(sets, coefficients)
            ]
        if name == "taskvec":
            n = self.model.cfg.n_layers
            chosen = layers or list(range(n // 4, 3 * n // 4 + 1, 2))
            self.task_vectors(chosen)  # one pass per direction for every layer
            return [self.make(name, {"layer": layer}) for layer in chosen]
        if name == "cad":
            return [self.make(name, {"alpha": a}) for a in alphas]
        if name in ("none", "icl"):
            return [self.make(name)]
        raise ValueError(
            f"no baseline sweep for {name!r}: SpARE has its own (`python -m spare_tl.sweep`)"
        )


def _site_set(spec: Sequence[int] | tuple[str, Sequence[int]]) -> tuple[str, list[int]]:
    """A layer set, or a (site, layer set) pair, as (site, layers)."""
    if len(spec) == 2 and isinstance(spec[0], str):
        return check_site(spec[0]), [int(x) for x in spec[1]]  # type: ignore[union-attr]
    return DEFAULT_SITE, [int(x) for x in spec]  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------
# The comparison table
# ---------------------------------------------------------------------------------------


def _cell(d: Mapping[str, Any], key: str) -> str:
    return f"{d[key]:.1f} ± {d[key + '_std']:.1f}"


def _transition(data: Mapping[str, Any], key: str) -> str:
    t = data.get("transitions", {}).get(key)
    return f"{t['mean']:.1f} ± {t['std']:.1f}" if t else "–"


def _format_hp(hp: Mapping[str, Any]) -> str:
    parts = []
    for k, v in hp.items():
        if k == "layers" and isinstance(v, list) and v == list(range(v[0], v[-1] + 1)):
            v = f"{v[0]}-{v[-1]}" if len(v) > 1 else str(v[0])
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def table_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method from :meth:`EvaluationResult.to_json` outputs."""
    rows = []
    for name, data in results.items():
        meta = data["method"]
        ctx = data.get("steer_to_context", data["no_steering"])
        mem = data.get("steer_to_memory", data["no_steering"])
        rel = meta["time_relative_to_no_steering"]
        steered = [rel[c] for c in ("steer_to_context", "steer_to_memory") if c in rel]
        rows.append(
            {
                "method": name,
                "EM_C": ctx["EM_C"],
                "EM_C_std": ctx["EM_C_std"],
                "EM_M": mem["EM_M"],
                "EM_M_std": mem["EM_M_std"],
                "EM_C->M": data.get("transitions", {}).get("EM_C->M"),
                "EM_M->C": data.get("transitions", {}).get("EM_M->C"),
                "extra_forward_passes_per_token": meta["extra_forward_passes_per_token"],
                "time_relative_to_no_steering": sum(steered) / len(steered) if steered else 1.0,
                "inference_time": meta["inference_time"],
                "hyperparameters": meta["hyperparameters"],
            }
        )
    return rows


def baseline_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: EM_C steering to context, EM_M steering to memory, transitions and cost."""
    lines = [
        "| method | EM_C, to context | EM_M, to memory | EM_C→M | EM_M→C "
        "| extra passes / token | time / item (× none) | settings (to context; to memory) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row, data in zip(table_rows(results), results.values()):
        hp = row["hyperparameters"]
        settings = "; ".join(_format_hp(hp[d]) for d in DIRECTIONS if d in hp and hp[d])
        star = "" if row["inference_time"] else " *"
        lines.append(
            f"| {row['method']}{star} | {row['EM_C']:.1f} ± {row['EM_C_std']:.1f} "
            f"| {row['EM_M']:.1f} ± {row['EM_M_std']:.1f} "
            f"| {_transition(data, 'EM_C->M')} | {_transition(data, 'EM_M->C')} "
            f"| {row['extra_forward_passes_per_token']:g} "
            f"| {row['time_relative_to_no_steering']:.2f} | {settings or '–'} |"
        )
    first = next(iter(results.values()))
    lines += [
        "",
        f"{first['model']}, {first['dataset']} dataset: {first['n_items']} held-out memorised "
        f"questions, {first['demo_type']} demonstrations, seeds {first['seeds']}, mean ± std "
        "over seeds (%). `none`: EM_C and EM_M without steering. Settings chosen on the "
        "development (pool) questions only (`cache_data/<model>/baselines/sweep-*.json`). "
        "\\* ICL changes the demonstrations (dss / dso) and is not an inference-time method. "
        "Time: wall time per item relative to no steering in the same run; task vectors and "
        "ActAdd's mean difference are computed once beforehand, CAD runs a second (context-"
        "free) prompt pass per item.",
    ]
    return "\n".join(lines)


def _protocol(config: EvaluationConfig, n_items: int, dataset: str) -> dict[str, Any]:
    return {
        "n_items": n_items,
        "seeds": list(config.seeds),
        "demo_type": config.demo_type,
        "n_shots": config.n_shots,
        "dataset": dataset,
    }


def _same_protocol(data: Mapping[str, Any], protocol: Mapping[str, Any]) -> bool:
    return (
        data.get("n_items") == protocol["n_items"]
        and data.get("seeds") == protocol["seeds"]
        and data.get("demo_type") == protocol["demo_type"]
        and data.get("dataset") == protocol["dataset"]
        and data.get("protocol", {}).get("n_shots") == protocol["n_shots"]
    )


def run_table(
    setup: BaselineSetup,
    methods: Sequence[str],
    *,
    config: EvaluationConfig,
    n_items: int | None,
    out_dir: Path,
    reuse: bool = False,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Evaluate every method on the held-out items with its dev-best settings (or, with
    ``reuse``, take saved results of the same protocol and settings), save per-method JSON
    and ``table.json``, return the markdown table and the results.

    ``table.json`` holds the model, the protocol and :func:`table_rows` (what the report
    renders); its ``markdown`` is the same table for people reading the file, never parsed."""
    items = setup.evaluation[:n_items] if n_items else setup.evaluation
    protocol = _protocol(config, len(items), setup.dataset)
    results: dict[str, dict[str, Any]] = {}
    shared: dict[int, tuple[list[str], float]] = {}  # no-steering answers, run once
    for name in methods:
        path = Path(out_dir) / f"{name}.json"
        method = setup.method(name)
        settings = {} if name == "none" else {d: method.hyperparameters(d) for d in DIRECTIONS}
        if reuse and path.exists():
            saved = cache.read_json(path)
            asked = saved_questions(Path(out_dir) / f"{name}-predictions.jsonl")
            if (
                _same_protocol(saved, protocol)
                and saved["method"]["hyperparameters"] == settings
                and asked == [it.question for it in items]
            ):
                logger.info("%s: reusing %s", name, path)
                results[name] = saved
                continue
        result = evaluate_method(
            setup.model,
            method,
            items,
            setup.pool,
            config=config,
            dataset_name=setup.dataset,
            progress=setup.progress,
            shared_no_steering=shared,
        )
        result.save(path, Path(out_dir) / f"{name}-predictions.jsonl")
        results[name] = result.to_json()
    table = baseline_table(results)
    model_name = next(iter(results.values()))["model"]
    cache.write_json(
        Path(out_dir) / "table.json",
        {"model": model_name, "protocol": protocol, "rows": table_rows(results), "markdown": table},
    )
    return table, results


# ---------------------------------------------------------------------------------------
# Command line: python -m spare_tl.baselines {sweep,table}
# ---------------------------------------------------------------------------------------


def _add_setup_args(p: argparse.ArgumentParser) -> None:
    add_dtype_argument(p)
    p.add_argument("--features", default=None, help="functional-feature folder (embedded default)")
    p.add_argument("--saes", default=None, help="folder of SAEs (embedded default)")
    p.add_argument("--dataset", default="builtin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spare_tl.baselines", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="choose a baseline's hyper-parameters on the pool")
    p.add_argument("--method", required=True, choices=[m for m in METHODS if m != "spare"])
    _add_setup_args(p)
    p.add_argument(
        "--layer-sets", nargs="+", default=None, help="ActAdd: e.g. 10-13 12-15 attn_out:20-23"
    )
    p.add_argument("--coefficients", type=float, nargs="+", default=list(DEFAULT_COEFFICIENTS))
    p.add_argument("--layers", type=int, nargs="+", default=None, help="task vector layers")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="CAD |α|")
    p.add_argument("--n-items", type=int, default=128, help="development questions")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--output", default=None, help="sweep JSON (default baselines/sweep-M.json)")

    p = sub.add_parser("table", help="evaluate the methods on held-out questions; write table")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    _add_setup_args(p)
    p.add_argument("--n-items", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--reuse", action="store_true", help="reuse saved results of this protocol")
    p.add_argument("--no-readme", action="store_true", help=argparse.SUPPRESS)  # old flag
    return parser


def _sweep_command(args: argparse.Namespace, setup: BaselineSetup) -> int:
    import json

    start = time.time()
    layer_sets = [parse_layer_set(s) for s in args.layer_sets] if args.layer_sets else None
    candidates = setup.grid(
        args.method,
        layer_sets=layer_sets,
        coefficients=args.coefficients,
        layers=args.layers,
        alphas=args.alphas,
    )
    from spare_tl.evaluation import development_items

    items = development_items(setup.evaluation, args.n_items)
    records = sweep_method(setup.model, candidates, items, setup.pool, n_shots=args.shots)
    path = Path(args.output) if args.output else sweep_path(setup.model.cfg.model_name, args.method)
    config = {
        "method": args.method,
        "candidates": [c.hyperparameters("context") for c in candidates],
        "n_items": args.n_items,
        "items": cache.fingerprint([it.question for it in items]),
        "dev_set": f"the last held-out questions (development_items), the test protocol "
        f"(doo, {args.shots} shots, demonstration seed 0)",
        "seconds": round(time.time() - start),
    }
    save_method_sweep(records, path, config)
    print(json.dumps({"no_steering": records[0], **best_settings(records)}, indent=1))
    print(f"wrote {path}")
    return 0


def _table_command(args: argparse.Namespace, setup: BaselineSetup) -> int:
    start = time.time()
    config = EvaluationConfig(seeds=tuple(args.seeds), n_shots=args.shots)
    out_dir = cache.stage_dir(setup.model.cfg.model_name, STAGE)
    table, _ = run_table(
        setup, args.methods, config=config, n_items=args.n_items, out_dir=out_dir, reuse=args.reuse
    )
    seeds = " ".join(map(str, args.seeds))
    table += (
        f"\nRegenerate: `python -m spare_tl.baselines table --methods {' '.join(args.methods)} "
        f"--n-items {args.n_items} --seeds {seeds}` ({time.time() - start:.0f} s"
        + (
            " with `--reuse`, which re-ran only the methods whose saved results were made "
            "with other settings or questions)."
            if args.reuse
            else ")."
        )
    )
    print(table)
    print("docs/results.md is regenerated from the saved JSON by `spare-tl docs`")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    torch.set_grad_enabled(False)
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES

    model, _, _ = load_steering_setup_for(
        args.features or DEFAULT_FEATURES, args.saes or DEFAULT_SAES, args.dtype
    )
    setup = BaselineSetup.load(args.features, args.saes, args.dataset, model=model)
    if args.command == "sweep":
        return _sweep_command(args, setup)
    return _table_command(args, setup)


if __name__ == "__main__":
    sys.exit(main())
