"""The attribution stage: each SAE latent's estimated effect on the answer, by attribution
patching (Syed et al. 2023; Marks et al. 2024, "sparse feature circuits").

For a grouped prompt with context answer C and memory answer M the metric is
m = logit(M's first token) − logit(C's first token) at the last prompt position. Moving latent
i of an SAE from its value z_i to a target z̄_i changes m by about g_i (z̄_i − z_i), with
g = ∂m/∂z. One backward pass per batch gives g for every latent of every SAE at once: at each
hook the last position's activation h becomes h + decode(z') − decode(z), z = code(h) and z' a
copy of z that requires grad; the forward pass is unchanged (the SAE's reconstruction error is
kept) and g = ∂m/∂z' (the decoder's Jacobian applied to ∂m/∂h). The edit and the metric sit at
the last prompt position, so with causal attention every earlier position's keys and values
are the same with and without it: the prompt without its last token runs once without
gradients, and only the last token runs with them.

Per latent the stage keeps the mean attribution **toward context**, −g (z̄_C − z) (how much
moving to the use-context mean lowers m), and **toward memory**, g (z̄_M − z), over the
use-context prompts, the use-memory prompts and both; prompts whose two answers share their
first token (m ≡ 0) are left out. z̄_C and z̄_M come from the statistics stage, the prompts
from the grouped pool prompts only. :func:`exact_patch_effects` measures the same changes
exactly (one latent set to its target, the difference decoded into the activation as the
SpARE edit does), to check the estimate.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.features import sae_fingerprint
from spare_tl.generation import _last_logits, _tokenize, left_pad
from spare_tl.kv_cache import expand_cache
from spare_tl.saes import (
    DEFAULT_SITE,
    check_latent_code,
    check_site,
    encode_with,
    hook_name,
    sae_identity,
    site_hook_name,
    validate_sae,
)
from spare_tl.stages.activations import check_layers
from spare_tl.stages.behaviours import GroupedPrompts
from spare_tl.stages.statistics import LayerStatistics

logger = logging.getLogger(__name__)

STAGE = "attribution"
FILE = "attribution.safetensors"
METRIC = "logit(memory answer first token) - logit(context answer first token), last position"
#: the prompt groups a latent's mean attribution is taken over (rows of the stored tensors)
GROUPS: tuple[str, ...] = ("use_context", "use_memory", "all")
#: the group a selection toward each direction ranks by: the prompts that still show the
#: other behaviour, where steering has work to do (on the others z ≈ z̄ and the estimate
#: says little)
SOURCE_GROUP = {"context": "use_memory", "memory": "use_context"}


@dataclass
class LayerAttribution:
    """Mean attribution per latent of one layer's SAE, toward each direction, per group."""

    layer: int
    hook_name: str
    sae_id: str
    to_context: Float[Tensor, "group d_sae"]  # rows: GROUPS
    to_memory: Float[Tensor, "group d_sae"]
    counts: dict[str, int]  # prompts per group
    latent_code: str = "encode"
    sae_fingerprint: str = ""

    def toward(self, direction: str, group: str | None = None) -> Float[Tensor, " d_sae"]:
        """Mean attribution toward ``direction`` over ``group`` (default: the prompts that
        still show the other behaviour, :data:`SOURCE_GROUP`)."""
        if direction not in SOURCE_GROUP:
            raise ValueError(f"direction must be 'context' or 'memory', got {direction!r}")
        group = group or SOURCE_GROUP[direction]
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        table = self.to_context if direction == "context" else self.to_memory
        return table[GROUPS.index(group)]

    def save(self, directory: Path, config: Mapping[str, Any], **extra: Any) -> None:
        """Write ``attribution.safetensors`` as a completed stage (``extra``: more entries
        for its ``config.json``, e.g. the seconds the computation took)."""
        directory = Path(directory)
        cache.begin_stage(directory)
        cache.write_tensors(
            directory / FILE,
            {"to_context": self.to_context.float(), "to_memory": self.to_memory.float()},
            metadata={
                "layer": str(self.layer),
                "hook_name": self.hook_name,
                "sae_id": self.sae_id,
                "groups": ",".join(GROUPS),
                "latent_code": self.latent_code,
                "sae_fingerprint": self.sae_fingerprint,
            },
        )
        cache.mark_complete(directory, config, files=[FILE], counts=self.counts, **extra)

    @classmethod
    def load(cls, directory: Path) -> LayerAttribution:
        """Load one layer's completed stage, checked against its manifest."""
        from safetensors import safe_open

        directory = Path(directory)
        meta = cache.verify_stage(directory)
        with safe_open(str(directory / FILE), framework="pt") as f:
            info = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(
            layer=int(info["layer"]),
            hook_name=info["hook_name"],
            sae_id=info["sae_id"],
            counts={k: int(v) for k, v in meta.get("counts", {}).items()},
            latent_code=info.get("latent_code", "encode"),
            sae_fingerprint=info.get("sae_fingerprint", ""),
            **tensors,
        )


def answer_first_tokens(model, answers: Sequence[str]) -> Int[Tensor, " n"]:
    """The first token of each answer as the model writes it after ``answer:`` (a leading
    space, as :func:`spare_tl.generation.answer_nll` scores it)."""
    ids = []
    for a in answers:
        toks = model.tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"answer {a!r} has no tokens")
        ids.append(toks[0])
    return torch.tensor(ids, dtype=torch.long)


def _check_answers(prompts, memory_tokens, context_tokens) -> None:
    if not (len(prompts) == len(memory_tokens) == len(context_tokens)):
        raise ValueError(
            f"one memory and one context answer token per prompt: {len(prompts)} prompts, "
            f"{len(memory_tokens)} memory and {len(context_tokens)} context tokens"
        )


def _prefix_cache(model, tokens: Tensor, mask: Tensor):
    """The KV cache of ``tokens`` without their last position (computed without grad)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
    if tokens.shape[1] > 1:
        with torch.no_grad():
            model(
                tokens[:, :-1],
                attention_mask=mask[:, :-1],
                past_kv_cache=kv,
                stop_at_layer=model.cfg.n_layers,
            )
    return kv


def _metric(logits: Tensor, memory: Tensor, context: Tensor) -> Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, memory.to(logits.device)] - logits[rows, context.to(logits.device)]


def latent_gradients(
    model,
    prompts: Sequence[str],
    memory_tokens: Int[Tensor, " n"],
    context_tokens: Int[Tensor, " n"],
    saes: Mapping[str, Any],
    *,
    latent_code: str = "encode",
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[dict[str, Float[Tensor, "n d_sae"]], dict[str, Float[Tensor, "n d_sae"]], Tensor]:
    """``(codes, gradients, metric)``: per hook of ``saes`` (keyed by hook name), the SAE code
    z of the last prompt position and ∂m/∂z, and the metric m per prompt (float32, CPU)."""
    check_latent_code(latent_code)
    _check_answers(prompts, memory_tokens, context_tokens)
    names = list(saes)
    missing = sorted(n for n in names if n not in model.hook_dict)
    if missing:
        raise ValueError(f"the model has no hook point(s) {missing}")
    n = len(prompts)
    codes = {h: torch.zeros(n, int(saes[h].cfg.d_sae)) for h in names}
    grads = {h: torch.zeros(n, int(saes[h].cfg.d_sae)) for h in names}
    metric = torch.zeros(n)
    if not n:
        return codes, grads, metric
    token_lists = _tokenize(model, prompts)
    order = sorted(range(n), key=lambda i: len(token_lists[i]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for batch in tqdm(batches, desc="attribution", disable=not progress, leave=False):
        tokens, mask = left_pad(model, [token_lists[i] for i in batch])
        kv = _prefix_cache(model, tokens, mask)
        leaves: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = [(h, _splice(saes[h], latent_code, leaves, h)) for h in names]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            resid = model(
                tokens[:, -1:],
                attention_mask=mask[:, -1:],
                past_kv_cache=kv,
                stop_at_layer=model.cfg.n_layers,
            )
            m = _metric(
                _last_logits(model, resid[:, -1]), memory_tokens[batch], context_tokens[batch]
            )
            got = torch.autograd.grad(m.sum(), [leaves[h][1] for h in names], allow_unused=True)
        for h, g in zip(names, got):
            codes[h][batch] = leaves[h][0].detach().float().cpu()
            if g is not None:  # None: the hook does not reach the metric
                grads[h][batch] = g.detach().float().cpu()
        metric[batch] = m.detach().float().cpu()
    return codes, grads, metric


def _splice(sae, latent_code: str, leaves: dict[str, tuple[Tensor, Tensor]], name: str):
    """A hook that leaves the activation as it is but routes its last position through the
    SAE's decoder from a code that requires grad: h + decode(z') − decode(z), z' = z."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        last = act[:, -1].to(sae.W_dec.dtype)
        with torch.no_grad():
            z = encode_with(sae, last, latent_code)
        leaf = z.clone().requires_grad_(True)
        decoded = sae.decode(torch.stack([leaf, z]))
        out = act.clone()
        out[:, -1] = (last + decoded[0] - decoded[1]).to(act.dtype)
        leaves[name] = (z, leaf)
        return out

    return hook


def attribution_scores(
    codes: Float[Tensor, "n d_sae"],
    gradients: Float[Tensor, "n d_sae"],
    target: Float[Tensor, " d_sae"],
) -> Float[Tensor, "n d_sae"]:
    """g (z̄ − z): the estimated change of the metric when each latent moves to ``target``."""
    return gradients * (target.to(codes)[None] - codes)


@torch.no_grad()
def exact_patch_effects(
    model,
    prompts: Sequence[str],
    memory_tokens: Int[Tensor, " n"],
    context_tokens: Int[Tensor, " n"],
    sae: Any,
    latents: Int[Tensor, " k"],
    target: Float[Tensor, " d_sae"],
    *,
    latent_code: str = "encode",
    progress: bool = False,
) -> Float[Tensor, "n k"]:
    """The exact change of the metric when one latent at a time is set to ``target`` at the
    last prompt position of the SAE's hook (the code difference decoded into the activation
    as the SpARE edit does), one prompt at a time with every latent a row of one pass."""
    check_latent_code(latent_code)
    _check_answers(prompts, memory_tokens, context_tokens)
    latents = torch.as_tensor(latents, dtype=torch.long)
    k = int(latents.numel())
    out = torch.zeros(len(prompts), k)
    name = hook_name(sae)
    rows = torch.arange(k)

    def patch(act: Tensor, hook: Any) -> Tensor:
        last = act[:, -1].to(sae.W_dec.dtype)
        z = encode_with(sae, last, latent_code)
        edited = z.clone()
        edited[rows, latents.to(z.device)] = target.to(z)[latents.to(z.device)]
        decoded = sae.decode(torch.stack([edited, z]))
        act = act.clone()
        act[:, -1] = (last + decoded[0] - decoded[1]).to(act.dtype)
        return act

    token_lists = _tokenize(model, prompts)
    for p, ids in enumerate(tqdm(token_lists, desc="exact patching", disable=not progress)):
        tokens, mask = left_pad(model, [ids])
        kv = expand_cache(_prefix_cache(model, tokens, mask), k + 1)
        with model.hooks(fwd_hooks=[(name, patch)]):
            resid = model(
                tokens[:, -1:].expand(k + 1, 1),
                attention_mask=mask[:, -1:].expand(k + 1, 1),
                past_kv_cache=kv,
                stop_at_layer=model.cfg.n_layers,
            )
        m = _metric(
            _last_logits(model, resid[:, -1]),
            memory_tokens[p].expand(k + 1),
            context_tokens[p].expand(k + 1),
        )
        out[p] = (m[:k] - m[k]).float().cpu()  # the last row is left unpatched
    return out


def grouped_answers(grouped: GroupedPrompts) -> tuple[list[str], Tensor, list[str], list[str]]:
    """The kept prompts (as :meth:`GroupedPrompts.labelled` orders them), their labels
    (1 context, 0 memory), and each one's first memory and context answer."""
    kept = [r for r in grouped.records if r["label"] in ("context", "memory")]
    labels = torch.tensor([1 if r["label"] == "context" else 0 for r in kept])
    memory = [r["org_answer"][0] for r in kept]
    context = [r["sub_answer"][0] for r in kept]
    return [r["prompt"] for r in kept], labels, memory, context


def _tensor_hash(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def group_means(scores: Float[Tensor, "n d_sae"], labels: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``scores`` over the valid use-context, use-memory and all prompts (rows
    :data:`GROUPS`; a group without prompts gives zeros)."""
    masks = [valid & (labels == 1), valid & (labels == 0), valid]
    return torch.stack(
        [
            scores[m].double().mean(0) if m.any() else scores.new_zeros(scores.shape[1])
            for m in masks
        ]
    ).float()


def latent_attribution(
    model,
    grouped: GroupedPrompts,
    statistics: Mapping[int, LayerStatistics],
    saes: Mapping[int, Any],
    *,
    site: str = DEFAULT_SITE,
    batch_size: int = 16,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[int, LayerAttribution]:
    """The attribution stage for every layer of ``saes`` at ``site`` (cached per layer under
    ``attribution/<site>-<layer>/``; stale layers are computed together in one pass per
    batch). z̄_C, z̄_M and the latent code come from ``statistics`` of the same SAEs."""
    check_site(site)
    layers = check_layers(model, list(saes))
    prompts, labels, memory, context = grouped_answers(grouped)
    base = {
        "stage": STAGE,
        "model": model.cfg.model_name,
        "grouped_hash": cache.fingerprint(
            {"p": prompts, "l": labels.tolist(), "m": memory, "c": context}
        ),
        "metric": METRIC,
        "estimator": "attribution patching: dm/dz (z_target - z), SAE error kept",
        "dtype": str(model.cfg.dtype),
    }
    root = cache.stage_dir(model.cfg.model_name, STAGE, cache_root)
    configs: dict[int, dict[str, Any]] = {}
    out: dict[int, LayerAttribution] = {}
    for layer in layers:
        if layer not in statistics:
            raise ValueError(
                f"no statistics for {site} layer {layer}; run `spare-tl statistics` with it"
            )
        sae, stats = saes[layer], statistics[layer]
        validate_sae(model, sae, layer, site=site)
        fp = sae_fingerprint(sae)
        if stats.sae_fingerprint and stats.sae_fingerprint != fp:
            raise ValueError(
                f"the {site} layer {layer} statistics were computed with another SAE "
                f"({stats.sae_fingerprint}, this one {fp}); rerun `spare-tl statistics`"
            )
        configs[layer] = {
            **base,
            "layer": layer,
            "hook": site_hook_name(layer, site),
            "sae_fingerprint": fp,  # the weights, wherever the SAE folder lies
            "latent_code": stats.latent_code,
            "targets": _tensor_hash(stats.context_activations, stats.memory_activations),
        }
        directory = root / f"{site}-{layer}"
        if use_cache and cache.is_fresh(directory, configs[layer]):
            out[layer] = LayerAttribution.load(directory)
    todo = [layer for layer in layers if layer not in out]
    if not todo:
        return out
    codes_of = {statistics[layer].latent_code for layer in todo}
    if len(codes_of) > 1:
        raise ValueError(f"the statistics use different latent codes {sorted(codes_of)}")
    mem_tok, ctx_tok = answer_first_tokens(model, memory), answer_first_tokens(model, context)
    valid = mem_tok != ctx_tok
    if not valid.any():
        raise ValueError("every grouped prompt's two answers share their first token")
    hooks = {site_hook_name(layer, site): saes[layer] for layer in todo}
    start = time.perf_counter()
    codes, grads, _ = latent_gradients(
        model,
        prompts,
        mem_tok,
        ctx_tok,
        hooks,
        latent_code=codes_of.pop(),
        batch_size=batch_size,
        progress=progress,
    )
    # the one pass served every stale layer: its time is theirs together
    seconds = round(time.perf_counter() - start, 1)
    counts = {
        g: int(m.sum())
        for g, m in zip(GROUPS, [valid & (labels == 1), valid & (labels == 0), valid])
    }
    for layer in todo:
        h, stats = site_hook_name(layer, site), statistics[layer]
        z, g = codes[h], grads[h]
        result = LayerAttribution(
            layer=layer,
            hook_name=h,
            sae_id=sae_identity(saes[layer]),
            to_context=group_means(
                -attribution_scores(z, g, stats.context_activations), labels, valid
            ),
            to_memory=group_means(
                attribution_scores(z, g, stats.memory_activations), labels, valid
            ),
            counts=counts,
            latent_code=stats.latent_code,
            sae_fingerprint=configs[layer]["sae_fingerprint"],
        )
        if use_cache:
            result.save(root / f"{site}-{layer}", configs[layer], seconds_all_layers=seconds)
        out[layer] = result
    return dict(sorted(out.items()))


def attribution_by_site(
    model,
    grouped: GroupedPrompts,
    site_statistics: Mapping[str, Mapping[int, LayerStatistics]],
    saes: Mapping[str, Any],
    layers: Mapping[str, Sequence[int]],
    *,
    batch_size: int = 16,
    cache_root: Path | None = None,
    progress: bool = True,
) -> dict[str, dict[int, LayerAttribution]]:
    """:func:`latent_attribution` for ``layers`` (site → layers), with the SAEs keyed by hook
    name and the statistics by site then layer (as :func:`~spare_tl.stages.pipeline.run_pipeline`
    returns them)."""
    out: dict[str, dict[int, LayerAttribution]] = {}
    for site, site_layers in layers.items():
        if not site_layers:
            continue
        if site not in site_statistics:
            raise ValueError(f"no statistics at site {site!r}; add its layers to the config")
        missing = [x for x in site_layers if site_hook_name(x, site) not in saes]
        if missing:
            raise ValueError(f"no SAE for the {site} layer(s) {missing}")
        out[site] = latent_attribution(
            model,
            grouped,
            site_statistics[site],
            {x: saes[site_hook_name(x, site)] for x in site_layers},
            site=site,
            batch_size=batch_size,
            cache_root=cache_root,
            progress=progress,
        )
    return out
