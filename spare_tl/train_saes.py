"""Train TopK SAEs for a model's mid layers with SAELens, and measure them on held-out prompts.

The embedded SmolLM2-135M-Instruct has no public SAEs, so spare-tl trains its own: one TopK
SAE per ``blocks.{l}.hook_resid_post`` of a band of consecutive mid layers, all from **one**
model forward pass per batch through SAELens's ``MultiSAETrainingRunner`` (each SAE keeps its
own optimiser, schedule, activation scaler and dead-latent tracking, as in single-SAE training).

Training text is the distribution SpARE reads: prompts built from a conflict dataset (the
built-in one by default) with every demonstration type (``dss``, ``dso``, ``doo``,
closed-book), 0-12 shots, conflicting and original contexts, each followed by the answer its
demonstrations teach. Prompts are packed into fixed-length rows that always start at a prompt
start, so position 0 of every row is a prompt's first token, as in real prompts. Position 0
itself is left out of training and of every metric: without a BOS token it is the model's
attention sink (in SmolLM2, from layer 11 on its residual norm is ~150x that of the other
positions) and SpARE never reads or edits it. The decoder bias starts at the activations'
mean (most of the residual's norm at these layers); from SAELens's zero start ~40 % of the
latents die.

Held-out evaluation uses prompts whose test items *and* demonstrations come from questions
that never occur in the training text, with a different seed. Per layer it reports the
explained variance, mean L0, the fraction of latents never active, and the increase in
next-token cross-entropy when the SAE reconstruction replaces the residual at that layer.

    python -m spare_tl.train_saes                       # layers 10-17 of the embedded model
    spare-tl train-saes --layers 10 11 --tokens 100000 --output /tmp/saes
    spare-tl sae-metrics                                # print the stored metrics table
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl.cache import fingerprint, read_json, stage_dir, write_json
from spare_tl.data.prompts import closed_book_prompt, conflict_prompt, sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.saes import DEFAULT_SITE, SITES, check_site, site_hook_name, site_of_hook

logger = logging.getLogger(__name__)

STAGE = "saes"
METRICS_FILE = "metrics.json"
DEFAULT_LAYERS: tuple[int, ...] = tuple(range(10, 18))

#: Prompt kinds and how often each is drawn for the training text.
PROMPT_KIND_WEIGHTS: dict[str, float] = {"dss": 0.25, "dso": 0.25, "doo": 0.3, "closed": 0.2}
#: Shot counts: SpARE reads 3-5-shot conflict prompts; the memorised set uses closed-book ones.
CONFLICT_SHOTS: tuple[int, ...] = (0, 1, 2, 3, 3, 4, 4, 5, 5, 6)
CLOSED_SHOTS: tuple[int, ...] = (0, 2, 4, 8, 12)
#: Share of conflict prompts whose test item shows its original (non-conflicting) context.
ORG_CONTEXT_SHARE = 0.25

METRIC_DEFINITIONS: dict[str, str] = {
    "explained_variance": "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over held-out tokens",
    "mean_l0": "mean number of non-zero latents per held-out token",
    "dead_fraction": "fraction of latents never non-zero on the held-out tokens",
    "ce_clean": "mean next-token cross-entropy of the model on the held-out prompts (nats)",
    "ce_spliced": "the same with the SAE reconstruction replacing the activation at its hook",
    "ce_increase": "ce_spliced - ce_clean",
    "positions": "all prompt positions except position 0 (the attention sink)",
}


@dataclass
class SAETrainingConfig:
    """What to train and how; stored in ``metrics.json`` beside the SAEs."""

    layers: tuple[int, ...] = DEFAULT_LAYERS
    #: where the SAEs read: ``resid_post`` (the residual after the block), ``attn_out`` or
    #: ``mlp_out`` (the block's attention or MLP output)
    site: str = "resid_post"
    d_sae: int | None = None  # default: expansion_factor * d_model
    expansion_factor: int = 4
    k: int = 64
    training_tokens: int = 196_608
    context_size: int = 256
    train_batch_size_tokens: int = 512
    store_batch_size_prompts: int = 8
    n_batches_in_buffer: int = 16
    lr: float = 7e-4
    lr_warm_up_steps: int | None = None  # default: 5 % of the steps
    lr_decay_steps: int | None = None  # default: the last 20 % of the steps
    adam_beta2: float = 0.999
    aux_loss_coefficient: float = 1.0
    dead_feature_window: int = 20  # steps without firing before the aux loss revives a latent
    #: ``"mean"``: start the decoder bias at the activations' mean (scaled as the SAE sees
    #: them), ``"zero"``: SAELens's default. The residual stream's mean is most of its norm
    #: (layer 12: 105 of 146); with a zero bias the latents whose encoder row points against
    #: it never reach the top k and die (41 % dead on held-out prompts, against 3 % with "mean").
    decoder_bias_init: str = "mean"
    n_rows_for_bias_init: int = 16
    n_batches_for_norm_estimate: int = 8
    skip_first_positions: int = 1
    seed: int = 0
    heldout_fraction: float = 0.1
    heldout_prompts: int = 96
    ce_prompts: int = 16
    eval_batch_size: int = 8
    save_dtype: str = "float16"

    def __post_init__(self) -> None:
        self.layers = tuple(sorted({int(layer) for layer in self.layers}))
        if not self.layers:
            raise ValueError("no layers to train")
        if self.n_batches_in_buffer * (self.context_size - self.skip_first_positions) < (
            self.train_batch_size_tokens
        ):
            raise ValueError(
                "n_batches_in_buffer * (context_size - skip_first_positions) must be >= "
                f"train_batch_size_tokens ({self.n_batches_in_buffer} * "
                f"({self.context_size} - {self.skip_first_positions}) < "
                f"{self.train_batch_size_tokens}); raise n_batches_in_buffer"
            )
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        check_site(self.site)
        if self.decoder_bias_init not in ("mean", "zero"):
            raise ValueError(
                f"decoder_bias_init must be 'mean' or 'zero', got {self.decoder_bias_init!r}"
            )

    def hook_name(self, layer: int) -> str:
        return site_hook_name(layer, self.site)

    @property
    def n_steps(self) -> int:
        return self.training_tokens // self.train_batch_size_tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


# --------------------------------------------------------------------------------------
# Training text
# --------------------------------------------------------------------------------------


def _question_key(item: ConflictItem) -> str:
    return " ".join(item.question.lower().split())


def split_items(
    items: Sequence[ConflictItem], heldout_fraction: float, seed: int
) -> tuple[list[ConflictItem], list[ConflictItem]]:
    """Split items into (training, held-out) by distinct question (seeded)."""
    groups: dict[str, list[ConflictItem]] = {}
    for item in items:
        groups.setdefault(_question_key(item), []).append(item)
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


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


@dataclass
class ReconstructionStats:
    """Running sums for explained variance, L0 and latent usage over batches of activations."""

    d_sae: int
    n_tokens: int = 0
    sse: float = 0.0
    sum_x: Tensor | None = None
    sum_sq: float = 0.0
    l0_sum: float = 0.0
    fire_counts: Tensor | None = None

    @torch.no_grad()
    def update(self, sae, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_in"]:
        """Add a batch; returns the reconstruction."""
        x = x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        z = sae.encode(x)
        x_hat = sae.decode(z)
        x64 = x.double()
        self.n_tokens += x.shape[0]
        self.sse += float((x64 - x_hat.double()).pow(2).sum())
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(x64.pow(2).sum())
        active = z != 0
        self.l0_sum += float(active.sum())
        counts = active.sum(0).double()
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        return x_hat

    def result(self) -> dict[str, float]:
        if self.n_tokens == 0 or self.sum_x is None or self.fire_counts is None:
            raise ValueError("no activations were added")
        sst = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n_tokens
        return {
            "explained_variance": 1.0 - self.sse / sst if sst > 0 else float("nan"),
            "mse": self.sse / self.n_tokens,
            "mean_l0": self.l0_sum / self.n_tokens,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "n_tokens": self.n_tokens,
        }


def reconstruction_metrics(sae, x: Float[Tensor, "n d_in"]) -> dict[str, float]:
    """Explained variance, MSE, mean L0 and dead-latent fraction of ``sae`` on ``x``."""
    stats = ReconstructionStats(sae.cfg.d_sae)
    stats.update(sae, x)
    return stats.result()


def _token_losses(logits: Float[Tensor, "b L v"], tokens: Int[Tensor, "b L"]) -> Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _pad_batch(seqs: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to one length: the tokens and a ``[b, L]`` mask of real tokens."""
    length = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return tokens, mask


def _batches(sequences: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate_saes(
    model,
    saes: dict[int, Any],
    sequences: Sequence[list[int]],
    *,
    ce_sequences: int | None = None,
    skip_first_positions: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Per-layer reconstruction and spliced-CE metrics of ``saes`` on token ``sequences``.

    Reconstruction metrics use every sequence (one pass up to the last SAE layer); the
    cross-entropy, which needs the whole model once plus once per layer, uses the first
    ``ce_sequences`` (default all). Sequences are right-padded (causal attention keeps real
    positions exact). The SAE reconstruction replaces the residual at every real position
    from ``skip_first_positions`` on; the model then runs on from the next block.
    """
    hooks = {layer: saes[layer].cfg.metadata.hook_name for layer in saes}
    stats = {layer: ReconstructionStats(saes[layer].cfg.d_sae) for layer in saes}
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    device = model.cfg.device
    stop = max(saes) + 1

    def batch(seqs: Sequence[list[int]], idx: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        tokens, mask = _pad_batch([seqs[i] for i in idx], pad_id)
        tokens, mask = tokens.to(device), mask.to(device)
        edit_mask = mask.clone()
        edit_mask[:, :skip_first_positions] = False
        return tokens, mask, edit_mask

    for idx in tqdm(_batches(sequences, batch_size), desc="held-out EV", disable=not progress):
        tokens, _, edit_mask = batch(sequences, idx)
        _, cache = model.run_with_cache(
            tokens, names_filter=list(hooks.values()), stop_at_layer=stop
        )
        for layer, sae in saes.items():
            stats[layer].update(sae, cache[hooks[layer]][edit_mask])

    ce_seqs = list(sequences[: ce_sequences or len(sequences)])
    ce_clean_sum = 0.0
    ce_spliced_sum = {layer: 0.0 for layer in saes}
    n_targets = 0
    for idx in tqdm(_batches(ce_seqs, batch_size), desc="held-out CE", disable=not progress):
        tokens, mask, edit_mask = batch(ce_seqs, idx)
        logits, cache = model.run_with_cache(tokens, names_filter=list(hooks.values()))
        target_mask = mask[:, 1:]
        n_targets += int(target_mask.sum())
        ce_clean_sum += float(_token_losses(logits, tokens)[target_mask].sum())
        del logits
        for layer, sae in saes.items():
            act = cache[hooks[layer]]
            x_hat = sae.decode(sae.encode(act[edit_mask].to(sae.W_enc.dtype)))
            spliced = act.clone()
            spliced[edit_mask] = x_hat.to(act.dtype)
            if hooks[layer].endswith("hook_resid_post"):
                out = model(spliced, start_at_layer=layer + 1)
            else:  # another site: splice it into a full forward pass
                out = model.run_with_hooks(
                    tokens, fwd_hooks=[(hooks[layer], lambda a, hook, s=spliced: s)]
                )
            ce_spliced_sum[layer] += float(_token_losses(out, tokens)[target_mask].sum())
            del out
    ce_clean = ce_clean_sum / n_targets
    results: dict[int, dict[str, float]] = {}
    for layer in saes:
        r = stats[layer].result()
        ce_spliced = ce_spliced_sum[layer] / n_targets
        r.update(
            ce_clean=ce_clean,
            ce_spliced=ce_spliced,
            ce_increase=ce_spliced - ce_clean,
            n_sequences=len(sequences),
            n_ce_sequences=len(ce_seqs),
            n_ce_tokens=n_targets,
        )
        results[layer] = r
    return results


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@torch.no_grad()
def activation_moments(
    model, rows: Sequence[list[int]], hook_names: Sequence[str], skip_first_positions: int = 1
) -> dict[str, tuple[Float[Tensor, " d"], float]]:
    """Per hook: the mean activation and the mean activation norm over ``rows`` (positions
    from ``skip_first_positions`` on), from one forward pass up to the last hook."""
    if not rows:
        raise ValueError("no rows to estimate the activation mean from")
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    stop = max(
        extract_stop_at_layer_from_tlens_hook_name(h) or model.cfg.n_layers for h in hook_names
    )
    tokens = torch.tensor([list(r) for r in rows], dtype=torch.long, device=model.cfg.device)
    _, cache = model.run_with_cache(tokens, names_filter=list(hook_names), stop_at_layer=stop)
    out = {}
    for h in hook_names:
        x = cache[h][:, skip_first_positions:].reshape(-1, cache[h].shape[-1]).double()
        out[h] = (x.mean(0).float().cpu(), float(x.norm(dim=-1).mean()))
    return out


def initial_training_saes(
    model, cfg: SAETrainingConfig, sae_configs: dict[str, Any], rows: Sequence[list[int]]
):
    """The untrained SAELens SAEs of ``sae_configs`` (hook name -> training config), their
    decoder bias at the activation mean when ``cfg.decoder_bias_init == "mean"``.

    SAELens scales the input to an average norm of ``sqrt(d_in)``
    (``expected_average_only_in``) before the SAE sees it, so the bias is the mean times the
    same factor, estimated here from the first ``cfg.n_rows_for_bias_init`` rows; the
    trainer's own estimate differs only by sampling, which an initial value tolerates.
    """
    from sae_lens import TopKTrainingSAE

    moments = {}
    if cfg.decoder_bias_init == "mean":
        moments = activation_moments(
            model, rows[: cfg.n_rows_for_bias_init], list(sae_configs), cfg.skip_first_positions
        )
    saes = {}
    for hook, sae_cfg in sae_configs.items():
        sae = TopKTrainingSAE(sae_cfg)
        if hook in moments:
            mean, mean_norm = moments[hook]
            with torch.no_grad():
                sae.b_dec.copy_(mean * (math.sqrt(sae_cfg.d_in) / mean_norm))
        saes[hook] = sae
    return saes


def _runner_config(model, cfg: SAETrainingConfig, model_name: str, workdir: Path):
    from sae_lens import LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig

    d_sae = cfg.d_sae or cfg.expansion_factor * model.cfg.d_model
    n_steps = cfg.n_steps
    warm_up = cfg.lr_warm_up_steps if cfg.lr_warm_up_steps is not None else n_steps // 20
    decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else n_steps // 5
    saes = {
        cfg.hook_name(layer): TopKTrainingSAEConfig(
            d_in=model.cfg.d_model,
            d_sae=d_sae,
            k=cfg.k,
            aux_loss_coefficient=cfg.aux_loss_coefficient,
            normalize_activations="expected_average_only_in",
            dtype="float32",
            device="cpu",
        )
        for layer in cfg.layers
    }
    return MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names={name: name for name in saes},
        model_name=model_name,
        model_class_name=type(model).__name__,
        dataset_path=f"spare_tl.train_saes:conflict-prompts(seed={cfg.seed})",
        streaming=False,
        context_size=cfg.context_size,
        n_batches_in_buffer=cfg.n_batches_in_buffer,
        training_tokens=cfg.training_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        seqpos_slice=(cfg.skip_first_positions, None),
        device=str(model.cfg.device),
        seed=cfg.seed,
        dtype="float32",
        prepend_bos=bool(model.cfg.default_prepend_bos),
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        adam_beta2=cfg.adam_beta2,
        lr=cfg.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warm_up,
        lr_decay_steps=decay,
        lr_end=cfg.lr / 10,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(cfg.dead_feature_window, 1000),
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=str(workdir / "checkpoints"),
        output_path=str(workdir / "runner"),
        exclude_special_tokens=True,
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
    )


def _save_inference_sae(src: Path, dst: Path, model_name: str, dtype: str):
    """Re-save a runner output folder with weights in ``dtype``; loads back as float32."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(src)
    sae.cfg.metadata.model_name = model_name
    sae.to(dtype=getattr(torch, dtype))
    sae.cfg.dtype = "float32"  # SAE.to records the dtype; loading converts back to this
    sae.save_model(dst)
    return SAE.load_from_disk(dst).eval()


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest``, replacing what is there (rename; the old one is removed)."""
    if dest.exists():
        trash = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, trash)
        os.replace(new, dest)
        shutil.rmtree(trash)
    else:
        os.replace(new, dest)


def train_saes(
    model,
    items: Sequence[ConflictItem],
    cfg: SAETrainingConfig,
    output_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.layers``' SAEs on prompts over ``items``, evaluate them on held-out prompts,
    and write them (SAELens folders) and ``metrics.json`` to ``output_dir``.

    Everything is built in a temporary folder beside ``output_dir``; each layer's folder is
    then renamed into place and ``metrics.json`` is merged and written atomically, so an
    interrupted run leaves the previous SAEs untouched. Returns the metrics record.
    """
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner

    t0 = time.perf_counter()
    model_name = model_name or model.cfg.model_name
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for layer in cfg.layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} is out of range (0-{model.cfg.n_layers - 1})")

    train_items, heldout_items = split_items(items, cfg.heldout_fraction, cfg.seed)
    n_positions = cfg.training_tokens + (cfg.n_batches_for_norm_estimate + 1) * (
        cfg.train_batch_size_tokens
    )
    n_positions += cfg.n_batches_in_buffer * cfg.context_size  # what stays in the mixing buffer
    text = build_training_text(model, train_items, cfg, n_positions)
    text.summary.update(n_train_questions=len(train_items), n_heldout_questions=len(heldout_items))
    logger.info(
        "training text: %d rows x %d tokens from %d prompts",
        len(text.rows),
        cfg.context_size,
        text.summary["n_prompts"],
    )

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        torch.manual_seed(cfg.seed)
        runner_cfg = _runner_config(model, cfg, model_name, work)
        initial = initial_training_saes(model, cfg, runner_cfg.saes, text.rows)
        # training needs autograd even if the caller (a notebook, say) switched it off
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.filterwarnings("ignore", message=".*fewer samples.*")
            warnings.filterwarnings("ignore", message=".*exhausted.*")
            runner = MultiSAETrainingRunner(
                runner_cfg,
                override_dataset=text.to_dataset(),
                override_model=model,
                override_saes=initial,
            )
            runner.run()
        t_train = time.perf_counter() - t0

        final = work / "final"
        saes = {}
        for layer in cfg.layers:
            name = cfg.hook_name(layer)
            saes[layer] = _save_inference_sae(
                work / "runner" / name, final / name, model_name, cfg.save_dtype
            )

        sequences = heldout_token_sequences(
            model, heldout_items, cfg.heldout_prompts, cfg.seed, max_len=model.cfg.n_ctx
        )
        metrics = evaluate_saes(
            model,
            saes,
            sequences,
            ce_sequences=cfg.ce_prompts,
            skip_first_positions=cfg.skip_first_positions,
            batch_size=cfg.eval_batch_size,
            progress=progress,
        )
        t_total = time.perf_counter() - t0

        config = cfg.to_dict()
        fp = fingerprint(config)
        run = {
            "config": config,
            "model_name": model_name,
            "training_data": text.summary,
            "heldout": {
                "n_prompts": len(sequences),
                "n_tokens": sum(len(s) for s in sequences),
                "questions": "disjoint from every training prompt (test items and demonstrations)",
            },
            "train_time_s": round(t_train, 1),
            "wall_time_s": round(t_total, 1),
            "torch_threads": torch.get_num_threads(),
            "sae_lens_version": _version("sae-lens"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        record = _merge_metrics(out / METRICS_FILE, model_name, fp, run, metrics, saes, cfg)

        out.mkdir(parents=True, exist_ok=True)
        for layer in cfg.layers:
            name = cfg.hook_name(layer)
            _replace_dir(final / name, out / name)
        write_json(out / METRICS_FILE, record)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def metrics_key(hook_name: str) -> str:
    """The key of an SAE in ``metrics.json``: the layer for a residual SAE (``"12"``), else
    ``"<layer>.<site>"`` (``"23.attn_out"``)."""
    layer, site = hook_name.split(".")[1], site_of_hook(hook_name)
    return layer if site == DEFAULT_SITE else f"{layer}.{site}"


def _key_order(key: str) -> tuple[int, str]:
    layer, _, site = key.partition(".")
    return int(layer), site


def _merge_metrics(
    path: Path,
    model_name: str,
    fp: str,
    run: dict[str, Any],
    metrics: dict[int, dict[str, float]],
    saes: dict[int, Any],
    cfg: SAETrainingConfig,
) -> dict[str, Any]:
    """Add this run's layers to an existing ``metrics.json`` (other layers are kept)."""
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = read_json(path)
        except json.JSONDecodeError:
            old = {}
    if old.get("model_name") not in (None, model_name):
        old = {}
    layers = dict(old.get("layers", {}))
    for layer, m in metrics.items():
        sae = saes[layer]
        layers[metrics_key(cfg.hook_name(layer))] = {
            "hook_name": cfg.hook_name(layer),
            "d_sae": sae.cfg.d_sae,
            "k": sae.cfg.k,
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()},
            "run": fp,
        }
    layers = dict(sorted(layers.items(), key=lambda kv: _key_order(kv[0])))
    runs = dict(old.get("runs", {}))
    runs[fp] = {**run, "layers": sorted(metrics), "site": cfg.site}
    used = {entry["run"] for entry in layers.values()}
    runs = {k: v for k, v in runs.items() if k in used}
    return {
        "model_name": model_name,
        "metric_definitions": METRIC_DEFINITIONS,
        "layers": layers,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------
# Reporting and command line
# --------------------------------------------------------------------------------------


def load_metrics(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``metrics.json`` of an SAE folder (default: the embedded model's)."""
    from spare_tl.models import EMBEDDED_MODEL

    d = Path(directory) if directory else stage_dir(EMBEDDED_MODEL, STAGE)
    path = d / METRICS_FILE if d.is_dir() or not d.suffix else d
    if not path.exists():
        raise FileNotFoundError(
            f"no {METRICS_FILE} at {path}; train SAEs with `spare-tl train-saes`"
        )
    return read_json(path)


def format_metrics_table(record: dict[str, Any]) -> str:
    """A plain-text table: one row per layer, plus each run's wall time."""
    header = (
        f"{'layer':>11}  {'d_sae':>6}  {'k':>4}  {'EV':>6}  {'L0':>6}  {'dead %':>6}  "
        f"{'CE clean':>8}  {'CE SAE':>8}  {'dCE':>7}"
    )
    lines = [f"SAEs for {record.get('model_name', '?')} (held-out prompts)", header]
    for layer, m in record.get("layers", {}).items():
        lines.append(
            f"{layer:>11}  {m['d_sae']:>6}  {m['k']:>4}  {m['explained_variance']:>6.3f}  "
            f"{m['mean_l0']:>6.1f}  {100 * m['dead_fraction']:>6.1f}  {m['ce_clean']:>8.3f}  "
            f"{m['ce_spliced']:>8.3f}  {m['ce_increase']:>7.3f}"
        )
    for fp, run in record.get("runs", {}).items():
        c = run["config"]
        lines.append(
            f"run {fp}: layers {run['layers']}, {c['training_tokens']:,} tokens, k={c['k']}, "
            f"lr={c['lr']}, wall time {run['wall_time_s'] / 60:.1f} min "
            f"(training {run['train_time_s'] / 60:.1f} min)"
        )
    return "\n".join(lines)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = SAETrainingConfig()
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    parser.add_argument(
        "--dataset", default="builtin", help="conflict dataset for the prompts (default builtin)"
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=list(d.layers), help="layers (default 10-17)"
    )
    parser.add_argument(
        "--site",
        choices=SITES,
        default=d.site,
        help="where the SAEs read: the residual (default) or the attention / MLP output",
    )
    parser.add_argument("--tokens", type=int, default=d.training_tokens, help="training tokens")
    parser.add_argument("--output", default=None, help="output folder (default: cache_data)")
    parser.add_argument("--k", type=int, default=d.k, help="TopK k")
    parser.add_argument("--d-sae", type=int, default=None, help="latents (default 4 x d_model)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    parser.add_argument("--batch-tokens", type=int, default=d.train_batch_size_tokens)
    parser.add_argument("--context-size", type=int, default=d.context_size)
    parser.add_argument("--heldout-prompts", type=int, default=d.heldout_prompts)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--decoder-bias-init",
        choices=("mean", "zero"),
        default=d.decoder_bias_init,
        help="initial decoder bias: the activation mean (default) or zero (SAELens's default)",
    )


def config_from_args(args: argparse.Namespace) -> SAETrainingConfig:
    return SAETrainingConfig(
        layers=tuple(args.layers),
        site=args.site,
        k=args.k,
        d_sae=args.d_sae,
        training_tokens=args.tokens,
        lr=args.lr,
        train_batch_size_tokens=args.batch_tokens,
        context_size=args.context_size,
        heldout_prompts=args.heldout_prompts,
        seed=args.seed,
        decoder_bias_init=args.decoder_bias_init,
    )


def run_from_args(args: argparse.Namespace) -> int:
    from spare_tl.data.datasets import load_dataset
    from spare_tl.models import EMBEDDED_MODEL, load_model

    cfg = config_from_args(args)
    model_name = args.model or EMBEDDED_MODEL
    t0 = time.perf_counter()
    model = load_model(model_name)
    items = load_dataset(args.dataset)
    output = Path(args.output) if args.output else stage_dir(model.cfg.model_name, STAGE)
    record = train_saes(model, items, cfg, output, model_name=model.cfg.model_name)
    print(format_metrics_table(record))
    print(f"total wall time incl. model load: {(time.perf_counter() - t0) / 60:.1f} min")
    print(f"written to {output}")
    return 0


def _print_metrics(args: argparse.Namespace) -> int:
    print(format_metrics_table(load_metrics(args.directory)))
    return 0


def register(sub: Any) -> None:
    """Add ``train-saes`` and ``sae-metrics``."""
    train = sub.add_parser(
        "train-saes",
        help="train the model's TopK SAEs (SAELens) on conflict prompts",
        description=__doc__.split("\n\n")[0],
    )
    add_train_arguments(train)
    train.set_defaults(func=run_from_args)
    show = sub.add_parser("sae-metrics", help="print the held-out metrics of trained SAEs")
    show.add_argument("directory", nargs="?", default=None, help="SAE folder (default: cache)")
    show.set_defaults(func=_print_metrics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spare_tl.train_saes", description=__doc__)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
