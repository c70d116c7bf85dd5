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

    spare-tl train-saes                                 # layers 10-17 of the embedded model
    spare-tl train-saes --layers 10 11 --tokens 100000 --output /tmp/saes
    spare-tl sae-metrics                                # print the stored metrics table
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from spare_tl.cache import fingerprint, read_json, stage_dir, write_json
from spare_tl.data.schema import ConflictItem
from spare_tl.saes import DEFAULT_SITE, site_of_hook
from spare_tl.stages.sae_config import (
    CLOSED_SHOTS,
    CONFLICT_SHOTS,
    DEFAULT_LAYERS,
    METRIC_DEFINITIONS,
    METRICS_FILE,
    ORG_CONTEXT_SHARE,
    PROMPT_KIND_WEIGHTS,
    STAGE,
    SAETrainingConfig,
)
from spare_tl.stages.sae_quality import (
    ReconstructionStats,
    evaluate_saes,
    reconstruction_metrics,
)
from spare_tl.stages.sae_text import (
    TrainingText,
    build_training_text,
    heldout_token_sequences,
    pack_prompt_aligned,
    prompt_texts,
    split_items,
    tokenize_text,
)

logger = logging.getLogger(__name__)

# the configuration, training text and quality metrics live in sae_config, sae_text and
# sae_quality; their names stay importable from here
__all__ = [
    "load_metrics",
    "CLOSED_SHOTS",
    "CONFLICT_SHOTS",
    "DEFAULT_LAYERS",
    "METRICS_FILE",
    "METRIC_DEFINITIONS",
    "ORG_CONTEXT_SHARE",
    "PROMPT_KIND_WEIGHTS",
    "ReconstructionStats",
    "SAETrainingConfig",
    "STAGE",
    "TrainingText",
    "activation_moments",
    "build_training_text",
    "evaluate_saes",
    "heldout_token_sequences",
    "initial_training_saes",
    "metrics_key",
    "pack_prompt_aligned",
    "prompt_texts",
    "reconstruction_metrics",
    "split_items",
    "tokenize_text",
    "train_saes",
]

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
        dataset_path=f"spare_tl.stages.train_saes:conflict-prompts(seed={cfg.seed})",
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


def load_metrics(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``metrics.json`` of an SAE folder (default: the embedded model's)."""
    from spare_tl.embedded import EMBEDDED_MODEL

    d = Path(directory) if directory else stage_dir(EMBEDDED_MODEL, STAGE)
    path = d / METRICS_FILE if d.is_dir() or not d.suffix else d
    if not path.exists():
        raise FileNotFoundError(
            f"no {METRICS_FILE} at {path}; train SAEs with `spare-tl train-saes`"
        )
    return read_json(path)
