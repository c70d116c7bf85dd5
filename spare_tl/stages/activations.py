"""Stage 2, activations: the residual stream (or another site) at the last prompt position of
every kept grouped prompt, for the chosen layers, in one forward pass per batch that stops
after the deepest one (``stop_at_layer``); a demonstration prefix every prompt shares is run
once. Cached under ``cache_data/<model>/activations[_<site>]/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.bridge import is_bridge
from spare_tl.generation import PromptPrefix, _tokenize, left_pad
from spare_tl.saes import (
    DEFAULT_SITE,
    check_site,
    site_hook_name,
)
from spare_tl.stages.behaviours import GroupedPrompts, require_groups


def check_layers(model, layers: Sequence[int]) -> list[int]:
    """Sorted unique layers, each inside the model; a clear error otherwise."""
    if not layers:
        raise ValueError("no layers given: pass at least one layer, e.g. --layers 10 11 12")
    bad = [layer for layer in layers if not 0 <= int(layer) < model.cfg.n_layers]
    if bad:
        raise ValueError(
            f"layer(s) {bad} are outside {model.cfg.model_name}, which has "
            f"{model.cfg.n_layers} layers (0-{model.cfg.n_layers - 1})"
        )
    return sorted({int(layer) for layer in layers})


@dataclass
class ActivationPass:
    """The batches of one :func:`last_position_activations` call: the prompts' own tokens
    after a shared prefix, sorted by length and cut into batches. Any run of the batches
    gives each row exactly the values the whole call gives it (a split stage runs some)."""

    names: list[str]
    stop: int | None
    prefix: PromptPrefix
    token_lists: list[list[int]]
    batches: list[list[int]]

    @classmethod
    def of(
        cls,
        model,
        prompts: Sequence[str],
        hook_names: Sequence[str],
        batch_size: int = 16,
        shared_demonstrations: bool = True,
    ) -> ActivationPass:
        names = sorted(set(hook_names))
        missing = [n for n in names if n not in model.hook_dict]
        if missing:
            raise ValueError(f"the model has no hook point(s) {missing}")
        depth = [int(n.split(".")[1]) for n in names if n.startswith("blocks.")]
        stop = max(depth) + 1 if depth and len(depth) == len(names) else None
        if not prompts:
            return cls(names, stop, PromptPrefix(0), [], [])
        full = _tokenize(model, prompts)
        # the bridge's KV-cache forward runs every layer; a prefix pays off only when stopping
        enabled = shared_demonstrations and not is_bridge(model)
        prefix = PromptPrefix.of(model, full, enabled=enabled)
        token_lists = prefix.own(full)
        order = sorted(range(len(prompts)), key=lambda i: len(token_lists[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return cls(names, stop, prefix, token_lists, batches)

    @torch.no_grad()
    def run(
        self, model, batches: Sequence[Sequence[int]], progress: bool = False
    ) -> dict[str, Float[Tensor, "rows d"]]:
        """Each hook's last-position activations of the rows of ``batches``, in their order."""
        parts: dict[str, list[Tensor]] = {name: [] for name in self.names}
        for batch in tqdm(batches, desc="activations", disable=not progress, leave=False):
            tokens, mask = left_pad(
                model, [self.token_lists[i] for i in batch], extra=self.prefix.length
            )
            extra = {}
            if self.prefix.length:
                extra = {"past_kv_cache": self.prefix.cache(model, len(batch))}
            _, store = model.run_with_cache(
                tokens,
                attention_mask=mask,
                padding_side="left",
                names_filter=lambda n: n in parts,
                stop_at_layer=self.stop,
                **extra,
            )
            for name in self.names:
                parts[name].append(store[name][:, -1].float().cpu())
        return {name: torch.cat(rows) for name, rows in parts.items() if rows}


def last_position_activations(
    model,
    prompts: Sequence[str],
    hook_names: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
    shared_demonstrations: bool = True,
) -> dict[str, Float[Tensor, "n d"]]:
    """The activation at each hook point at the last prompt position, one pass per batch
    (stopping after the deepest block asked for). A token prefix every prompt shares (one
    demonstration set) is run once and each batch continues from its KV cache
    (:class:`~spare_tl.generation.PromptPrefix`; ``shared_demonstrations=False``: not)."""
    plan = ActivationPass.of(model, prompts, hook_names, batch_size, shared_demonstrations)
    if not prompts:
        return {name: torch.zeros(0, model.cfg.d_model) for name in plan.names}
    return place_rows(plan.run(model, plan.batches, progress), plan.batches, len(prompts))


def place_rows(
    acts: dict[str, Float[Tensor, "rows d"]], batches: Sequence[Sequence[int]], n: int
) -> dict[str, Float[Tensor, "n d"]]:
    """Rows of ``acts`` (in the order of ``batches``) put back at their prompts' places."""
    rows = [i for batch in batches for i in batch]
    out = {}
    for name, values in acts.items():
        out[name] = torch.zeros(n, values.shape[-1])
        out[name][rows] = values
    return out


def last_position_resid(
    model,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    site: str = DEFAULT_SITE,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, Float[Tensor, "n d_model"]]:
    """The activation at ``site`` of each layer (default: the residual after it) at the last
    prompt position, one pass per batch."""
    layers = check_layers(model, layers)
    acts = last_position_activations(
        model,
        prompts,
        [site_hook_name(layer, site) for layer in layers],
        batch_size=batch_size,
        progress=progress,
    )
    return {layer: acts[site_hook_name(layer, site)] for layer in layers}


def stage_name(stage: str, site: str = DEFAULT_SITE) -> str:
    """The cache folder of a per-site stage: ``stage`` for the residual, ``stage_<site>``
    for another site (``activations_attn_out``)."""
    return stage if check_site(site) == DEFAULT_SITE else f"{stage}_{site}"


@dataclass
class Activations:
    """Last-position activations of the two behaviour groups at one site per layer (the
    residual unless ``site`` says otherwise)."""

    model_name: str
    resid: dict[int, Float[Tensor, "n d_model"]]
    labels: Int[Tensor, " n"]  # 1 context, 0 memory
    weights: Float[Tensor, " n"]  # confidence weights
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> str:
        return str(self.config.get("hook", "hook_" + DEFAULT_SITE)).removeprefix("hook_")

    def stage_files(self) -> dict[str, Callable[[Path], None]]:
        """The stage's files as ``{name: atomic writer of that file's path}``."""
        tensors = {f"layer{k}": v for k, v in self.resid.items()}
        tensors.update(labels=self.labels, weights=self.weights)
        return {"activations.safetensors": lambda p: cache.write_tensors(p, tensors)}

    def manifest(self) -> dict[str, Any]:
        """What ``config.json`` records beside the config and the files."""
        return {"layers": sorted(self.resid)}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        cache.begin_stage(directory)
        files = self.stage_files()
        for name, write in files.items():
            write(directory / name)
        cache.mark_complete(directory, self.config, files=list(files), **self.manifest())

    @classmethod
    def load(cls, directory: Path) -> Activations:
        """Load a completed stage, its file checked against the manifest first."""
        directory = Path(directory)
        meta = cache.verify_stage(directory)
        t = cache.read_tensors(directory / "activations.safetensors")
        resid = {int(k[5:]): v for k, v in t.items() if k.startswith("layer")}
        return cls(meta["config"]["model"], resid, t["labels"], t["weights"], meta["config"])


def activations_config(
    model, grouped: GroupedPrompts, layers: Sequence[int], site: str = DEFAULT_SITE
) -> dict[str, Any]:
    """The activations stage's config (its cache key) for ``grouped``'s kept prompts."""
    prompts, labels, _ = grouped.labelled()
    return {
        "stage": "activations",
        "model": model.cfg.model_name,
        "layers": check_layers(model, layers),
        "grouped_hash": cache.fingerprint({"p": prompts, "l": labels.tolist()}),
        "position": "last prompt token",
        "hook": f"hook_{check_site(site)}",
        "dtype": str(model.cfg.dtype),  # bf16 and fp32 activations select different features
    }


def collect_activations(
    model,
    grouped: GroupedPrompts,
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    min_per_group: int = 2,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    site: str = DEFAULT_SITE,
) -> Activations:
    """The activations stage: last-position activations at ``site`` (default the residual) of the
    use-context and use-memory prompts (cached)."""
    layers = check_layers(model, layers)
    require_groups(grouped, min_per_group)
    prompts, labels, weights = grouped.labelled()
    config = activations_config(model, grouped, layers, site)
    directory = cache.stage_dir(model.cfg.model_name, stage_name("activations", site), cache_root)
    if use_cache and cache.is_fresh(directory, config):
        return Activations.load(directory)
    resid = last_position_resid(
        model, prompts, layers, site=site, batch_size=batch_size, progress=progress
    )
    result = Activations(model.cfg.model_name, resid, labels, weights, config)
    if use_cache:
        result.save(directory)
    return result
