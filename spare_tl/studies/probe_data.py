"""Probing data for the knowledge-conflict probes: paired prompts and their residuals.

For every question, the same k demonstrations followed by the test question once with its
conflicting context (``sub_context``, label 1) and once with the consistent one
(``org_context``, label 0) (:func:`probe_prompts`); the last-prompt-position residual
``blocks.{l}.hook_resid_post`` at each layer, and the SAE codes where an SAE is given
(:func:`build_probe_dataset`, cached under ``cache_data/<model>/probes/dataset/``). Train/test
splits are by question (:func:`split_by_question`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from spare_tl import cache
from spare_tl.data.prompts import conflict_prompt, question_key, sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.saes import encode_latents, sae_identity, validate_sae
from spare_tl.stages.activations import check_layers, last_position_resid

logger = logging.getLogger(__name__)

__all__ = [
    "CONFLICT",
    "NO_CONFLICT",
    "ProbeDataset",
    "ProbePrompts",
    "build_probe_dataset",
    "probe_prompts",
    "split_by_question",
]

FeatureKind = Literal["resid", "sae"]
STAGE = "probes"
#: Label of a prompt: 1 = conflicting context (``sub_context``), 0 = consistent (``org_context``).
CONFLICT, NO_CONFLICT = 1, 0


def _demo_seed(seed: int, index: int) -> int:
    """The demonstration seed of item ``index`` (the same rule as :func:`evaluation.evaluate`)."""
    return seed * 1_000_003 + index


@dataclass
class ProbePrompts:
    """Paired prompts: row 2j is item j's conflict prompt, row 2j + 1 its consistent one."""

    prompts: list[str]
    labels: Int[Tensor, " n"]
    question_ids: Int[Tensor, " n"]
    item_ids: Int[Tensor, " n"]
    questions: list[str]


def probe_prompts(
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    n_shots: int = 3,
    demo_type: str = "doo",
    seed: int = 0,
    n_demo_sets: int = 1,
) -> ProbePrompts:
    """A conflicting and a consistent prompt per item and demonstration set, same demos.

    Demonstration set ``s`` of item ``i`` uses seed ``(seed + s) * 1_000_003 + i`` (the
    evaluation's rule), never the item's own question.
    """
    if n_demo_sets < 1:
        raise ValueError(f"n_demo_sets must be >= 1, got {n_demo_sets}")
    if not items:
        raise ValueError("no items to probe")
    keys: dict[str, int] = {}
    prompts: list[str] = []
    labels: list[int] = []
    qids: list[int] = []
    iids: list[int] = []
    for s in range(n_demo_sets):
        for i, item in enumerate(items):
            demos = sample_demonstrations(pool, n_shots, seed=_demo_seed(seed + s, i), exclude=item)
            qid = keys.setdefault(question_key(item), len(keys))
            for context, label in (("sub", CONFLICT), ("org", NO_CONFLICT)):
                prompts.append(conflict_prompt(item, demos, demo_type, context=context))
                labels.append(label)
                qids.append(qid)
                iids.append(i)
    return ProbePrompts(
        prompts=prompts,
        labels=torch.tensor(labels, dtype=torch.long),
        question_ids=torch.tensor(qids, dtype=torch.long),
        item_ids=torch.tensor(iids, dtype=torch.long),
        questions=list(keys),
    )


@dataclass
class ProbeDataset:
    """Last-position residuals (and SAE codes) of conflicting and consistent prompts.

    ``codes`` are stored in float16 (the embedded SAEs are fp16 themselves); use
    :meth:`features` to get float32 inputs for a probe.
    """

    model_name: str
    resid: dict[int, Float[Tensor, "n d_model"]]
    codes: dict[int, Float[Tensor, "n d_sae"]]
    labels: Int[Tensor, " n"]
    question_ids: Int[Tensor, " n"]
    item_ids: Int[Tensor, " n"]
    questions: list[str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.resid)

    @property
    def sae_layers(self) -> list[int]:
        return sorted(self.codes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def features(self, layer: int, kind: FeatureKind = "resid") -> Float[Tensor, "n d"]:
        """Probe inputs at ``layer``: the residual stream or the SAE codes, float32."""
        source = {"resid": self.resid, "sae": self.codes}.get(kind)
        if source is None:
            raise ValueError(f"features must be 'resid' or 'sae', got {kind!r}")
        if layer not in source:
            what = "residuals" if kind == "resid" else "SAE codes"
            raise ValueError(f"no {what} for layer {layer}; have layers {sorted(source)}")
        return source[layer].float()

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        tensors = {f"resid.layer{k}": v.float() for k, v in self.resid.items()}
        tensors |= {f"codes.layer{k}": v.half() for k, v in self.codes.items()}
        tensors |= {
            "labels": self.labels,
            "question_ids": self.question_ids,
            "item_ids": self.item_ids,
        }
        cache.begin_stage(directory)  # incomplete until config.json is written last
        cache.write_tensors(directory / "probe_dataset.safetensors", tensors)
        cache.write_json(
            directory / "questions.json",
            {"model": self.model_name, "questions": self.questions},
        )
        cache.mark_complete(directory, self.config, layers=self.layers, sae_layers=self.sae_layers)

    @classmethod
    def load(cls, directory: Path) -> ProbeDataset:
        directory = Path(directory)
        t = cache.read_tensors(directory / "probe_dataset.safetensors")
        meta = cache.read_json(directory / "questions.json")
        config = cache.read_json(directory / "config.json")["config"]
        return cls(
            model_name=meta["model"],
            resid={
                int(k.removeprefix("resid.layer")): v
                for k, v in t.items()
                if k.startswith("resid.layer")
            },
            codes={
                int(k.removeprefix("codes.layer")): v
                for k, v in t.items()
                if k.startswith("codes.layer")
            },
            labels=t["labels"],
            question_ids=t["question_ids"],
            item_ids=t["item_ids"],
            questions=list(meta["questions"]),
            config=config,
        )


def _sae_hash(sae: Any) -> str:
    return cache.fingerprint(
        {"id": sae_identity(sae), "w": float(sae.W_enc.detach().double().sum()), "d": sae.cfg.d_sae}
    )


def _items_hash(items: Sequence[ConflictItem]) -> str:
    return cache.fingerprint({"items": [it.to_dict() for it in items]})


def build_probe_dataset(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    layers: Sequence[int],
    *,
    n_shots: int = 3,
    demo_type: str = "doo",
    seed: int = 0,
    n_demo_sets: int = 1,
    saes: Mapping[int, Any] | None = None,
    batch_size: int = 16,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ProbeDataset:
    """Residuals (and SAE codes) of paired conflict / no-conflict prompts (cached).

    Cached under ``cache_data/<model>/probes/dataset/``; an unchanged config is loaded.
    SAE codes are taken at every layer of ``layers`` that has an SAE in ``saes``.
    """
    layers = check_layers(model, layers)
    saes = {int(k): v for k, v in (saes or {}).items() if int(k) in layers}
    for layer, sae in saes.items():
        validate_sae(model, sae, layer)
    data = probe_prompts(
        items, pool, n_shots=n_shots, demo_type=demo_type, seed=seed, n_demo_sets=n_demo_sets
    )
    config = {
        "stage": f"{STAGE}/dataset",
        "model": model.cfg.model_name,
        "items": _items_hash(items),
        "pool": _items_hash(pool),
        "layers": layers,
        "saes": {str(k): _sae_hash(v) for k, v in sorted(saes.items())},
        "n_shots": n_shots,
        "demo_type": demo_type,
        "seed": seed,
        "n_demo_sets": n_demo_sets,
        "position": "last prompt token",
        "hook": "hook_resid_post",
        "labels": "1 = sub_context (conflict), 0 = org_context (no conflict)",
    }
    directory = cache.stage_dir(model.cfg.model_name, STAGE, cache_root) / "dataset"
    if use_cache and cache.is_fresh(directory, config):
        logger.info("probe dataset: cached in %s", directory)
        return ProbeDataset.load(directory)
    logger.info(
        "probe dataset: %d prompts (%d questions) at layers %s",
        len(data.prompts),
        len(data.questions),
        layers,
    )
    resid = last_position_resid(
        model, data.prompts, layers, batch_size=batch_size, progress=progress
    )
    codes = {
        layer: encode_latents(sae, resid[layer]).detach().to("cpu", torch.float16)
        for layer, sae in sorted(saes.items())
    }
    dataset = ProbeDataset(
        model_name=model.cfg.model_name,
        resid=resid,
        codes=codes,
        labels=data.labels,
        question_ids=data.question_ids,
        item_ids=data.item_ids,
        questions=data.questions,
        config=config,
    )
    if use_cache:
        dataset.save(directory)
    return dataset


def split_by_question(
    question_ids: Int[Tensor, " n"], test_fraction: float, seed: int
) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
    """Row indices of training and test prompts; every question lies on one side only."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    qids = np.asarray(question_ids)
    unique = np.unique(qids)
    if unique.size < 2:
        raise ValueError(f"need at least 2 distinct questions to split, got {unique.size}")
    n_test = min(max(1, round(test_fraction * unique.size)), unique.size - 1)
    test_q = np.random.default_rng(seed).permutation(unique)[:n_test]
    is_test = np.isin(qids, test_q)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
