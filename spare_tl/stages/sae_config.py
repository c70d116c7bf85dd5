"""The SAE-training stage's configuration and constants (:mod:`spare_tl.stages.train_saes`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from spare_tl.saes import check_site, site_hook_name

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
