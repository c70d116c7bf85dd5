"""How good trained SAEs are on held-out prompts: explained variance, L0, dead latents and the
increase in next-token cross-entropy when the SAE replaces the activation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


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
