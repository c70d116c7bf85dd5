"""The steerability scan: where, along the depth, can the model's behaviour be changed?

Mutual information says where the behaviour is *readable*; the scan measures where it is
*steerable*. On development questions (never test questions), for every layer and site
(``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``) and both directions, the
activation at the **last prompt position** of the conflict prompt is replaced by a donor
run's activation at its last position, and the patched model answers greedily:

- **memory donor**: the same question closed-book, with the same demonstrations rendered
  closed-book (the model answering from memory);
- **context donor**: the same conflict prompt with context-following (``dss``)
  demonstrations.

A patch that moves EM_M (memory donor) or EM_C (context donor) shows a place where an edit
at the last prompt position can steer the model; its EM is the **oracle** for any edit
there (SpARE's sparse edit included), since it writes the whole activation of a run that
behaves the other way. Every patch edits only the last prompt position, so the scan runs as
conditions of the one harness, from one prompt pass per batch
(:func:`spare_tl.stages.harness.answer_prompts`).

    spare-tl scan configs/smollm2.toml            # -> cache_data/<model>/scan/scan.json
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from jaxtyping import Float
from torch import Tensor

from spare_tl import cache
from spare_tl.data.prompts import (
    Questions,
    closed_book_prompt,
    conflict_prompt,
    relation_histogram,
)
from spare_tl.data.schema import ConflictItem
from spare_tl.generation import Decoding
from spare_tl.hardware import describe
from spare_tl.methods.spare import Direction, LastPromptPositionHook, attach_hooks
from spare_tl.saes import SITES, site_hook_name
from spare_tl.stages.activations import last_position_activations
from spare_tl.stages.evaluation import evaluation_questions
from spare_tl.stages.harness import Condition, NoSteering, PromptMethod, answer_prompts
from spare_tl.stages.sweep import answer_shares

logger = logging.getLogger(__name__)

STAGE = "scan"
TARGET = {"memory": "EM_M", "context": "EM_C"}
DONOR_DEMO_TYPE = "dss"  # the context donor's demonstrations (follow the context)


@dataclass(frozen=True)
class ScanConfig:
    """What the scan patches and on which questions (layers None: every layer)."""

    layers: tuple[int, ...] | None = None
    sites: tuple[str, ...] = SITES
    directions: tuple[str, ...] = ("memory", "context")
    n_shots: int = 3
    demo_type: str = "doo"
    seed: int = 0
    max_new_tokens: int = 12
    batch_size: int = 16
    demonstrations: str = "per_seed"

    def __post_init__(self) -> None:
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise ValueError(f"sites must be a non-empty subset of {SITES}, got {self.sites}")
        if not self.directions or any(d not in TARGET for d in self.directions):
            raise ValueError(f"directions must be 'memory' and/or 'context', got {self.directions}")
        if self.n_shots < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("n_shots must be >= 0, batch_size and max_new_tokens >= 1")


@dataclass
class DonorPatch(PromptMethod):
    """Replace the activation at ``hook_name`` at the last prompt position of row i by
    ``donor[i]`` (the donor run's last-position activation of the same item)."""

    hook_name: str
    donor: Float[Tensor, "n d"]
    name: ClassVar[str] = "donor_patch"

    def row_steering(
        self, model, direction: Direction, rows: Sequence[int]
    ) -> AbstractContextManager[Any]:
        values = self.donor[list(rows)]
        hook = LastPromptPositionHook(lambda h: values.to(device=h.device, dtype=h.dtype))
        return attach_hooks(model, [(self.hook_name, hook)])


@dataclass
class ScanResult:
    """EM_C / EM_M / neither (%) per (site, layer, direction) patch, and without a patch."""

    model_name: str
    n_items: int
    baseline: dict[str, float]
    donors: dict[str, dict[str, float]]  # what each donor run answers itself
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    relations: dict[str, int] = field(default_factory=dict)  # the questions' histogram
    seconds: float | None = None  # wall time of the scan
    machine: str | None = None
    answers: dict[str, list[str]] = field(default_factory=dict)  # condition -> greedy answers

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScanResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def save(self, directory: Path, fingerprint_config: Mapping[str, Any]) -> None:
        directory = Path(directory)
        cache.begin_stage(directory)
        cache.write_json(directory / "scan.json", self.to_json())
        cache.mark_complete(directory, fingerprint_config, files=["scan.json"])

    @classmethod
    def load(cls, directory: Path) -> ScanResult:
        directory = Path(directory)
        cache.verify_stage(directory)
        return cls.from_json(cache.read_json(directory / "scan.json"))

    def layers(self, site: str = "resid_post") -> list[int]:
        return sorted({r["layer"] for r in self.rows if r["site"] == site})

    def effect(self, direction: str, site: str = "resid_post") -> dict[int, float]:
        """Per layer: the patch's gain (points) in the direction's target over no patch."""
        key = TARGET[direction]
        return {
            r["layer"]: r[key] - self.baseline[key]
            for r in self.rows
            if r["site"] == site and r["direction"] == direction
        }

    def oracle(self, direction: str, layers: Sequence[int], site: str = "resid_post") -> float:
        """The best single-layer patch EM in ``direction``'s target over ``layers``."""
        key = TARGET[direction]
        values = [
            r[key]
            for r in self.rows
            if r["site"] == site and r["direction"] == direction and r["layer"] in set(layers)
        ]
        if not values:
            raise ValueError(f"the scan has no {site} patch at layers {list(layers)}")
        return max(values)

    def steerable_layers(
        self, direction: str = "memory", site: str = "resid_post", share: float = 0.5
    ) -> list[int]:
        """The rule for where to put SAEs: layers whose patch reaches at least ``share`` of
        the largest gain over the whole depth (empty when no patch gains anything)."""
        gains = self.effect(direction, site)
        best = max(gains.values(), default=0.0)
        if best <= 0:
            return []
        return sorted(layer for layer, g in gains.items() if g >= share * best)


def donor_prompts(
    items: Sequence[ConflictItem], demonstrations: Sequence[Sequence[ConflictItem]]
) -> dict[str, list[str]]:
    """The memory donor (closed-book, same demonstrations closed-book) and the context donor
    (the conflict prompt with ``dss`` demonstrations) of every item."""
    return {
        "memory": [closed_book_prompt(it, d) for it, d in zip(items, demonstrations)],
        "context": [
            conflict_prompt(it, d, DONOR_DEMO_TYPE) for it, d in zip(items, demonstrations)
        ],
    }


@dataclass
class ScanPlan:
    """What a scan asks, resolved once: its layers, questions, donor prompts and decoding.
    Its work splits into units (``"none"``: no patch and the donors' own answers;
    ``"layer-<l>"``: every site and direction at one layer) that :func:`scan_unit` answers
    independently, so ranks can share them (:mod:`spare_tl.stages.sharded`)."""

    config: ScanConfig
    items: Sequence[ConflictItem]
    layers: list[int]
    questions: Questions
    donors: dict[str, list[str]]
    decoding: Decoding
    _acts: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        model,
        items: Sequence[ConflictItem],
        pool: Sequence[ConflictItem],
        config: ScanConfig | None = None,
        progress: bool = True,
    ) -> ScanPlan:
        config = config or ScanConfig()
        if not items:
            raise ValueError("the scan needs at least one development question")
        n_layers = int(model.cfg.n_layers)
        layers = list(range(n_layers)) if config.layers is None else sorted(set(config.layers))
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad or not layers:
            raise ValueError(f"layers {bad or '(none)'} are not in the model's 0-{n_layers - 1}")
        questions = evaluation_questions(
            items, pool, config.n_shots, config.seed, config.demo_type, config.demonstrations
        )
        decoding = Decoding(
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            progress=progress,
            desc="steerability scan",
        )
        donors = donor_prompts(items, questions.demonstrations)
        return cls(config, items, layers, questions, donors, decoding)

    def units(self) -> list[str]:
        return ["none", *(f"layer-{layer}" for layer in self.layers)]

    def donor_activations(self, model, direction: str) -> dict[str, Tensor]:
        """The donor run's last-position activation at every scanned hook (computed once)."""
        if direction not in self._acts:
            hooks = [site_hook_name(la, s) for la in self.layers for s in self.config.sites]
            self._acts[direction] = last_position_activations(
                model,
                self.donors[direction],
                hooks,
                batch_size=self.config.batch_size,
                progress=self.decoding.progress,
            )
        return self._acts[direction]

    def conditions(self, model, unit: str) -> list[Condition]:
        """The unit's conditions: no patch, or every (direction, site) patch at its layer."""
        if unit == "none":
            return [Condition("none", NoSteering())]
        layer = int(unit.removeprefix("layer-"))
        out = []
        for direction in self.config.directions:
            acts = self.donor_activations(model, direction)
            for site in self.config.sites:
                hook = site_hook_name(layer, site)
                patch = DonorPatch(hook, acts[hook])
                out.append(Condition(f"{direction}|{site}|{layer}", patch, direction))  # type: ignore[arg-type]
        return out

    def result(
        self, model, answered: dict[str, list[str]], donors: dict[str, dict[str, float]]
    ) -> ScanResult:
        """The :class:`ScanResult` of every unit's answers (rows in the one-process order)."""
        rows, names = [], []
        for direction in self.config.directions:
            for layer in self.layers:
                for site in self.config.sites:
                    name = f"{direction}|{site}|{layer}"
                    names.append(name)
                    rows.append(
                        {"direction": direction, "site": site, "layer": layer}
                        | answer_shares(answered[name], self.items)
                    )
        return ScanResult(
            model_name=model.cfg.model_name,
            n_items=len(self.items),
            baseline=answer_shares(answered["none"], self.items),
            donors=donors,
            rows=rows,
            config=json.loads(json.dumps(asdict(self.config) | {"layers": self.layers})),
            relations=relation_histogram(self.items),
            machine=describe(),
            answers={name: list(answered[name]) for name in ["none", *names]},
        )


def donor_shares(model, plan: ScanPlan) -> dict[str, dict[str, float]]:
    """What each donor run answers itself (EM_C / EM_M / neither, %)."""
    return {
        direction: answer_shares(
            answer_prompts(
                model,
                plan.donors[direction],
                [Condition("donor", NoSteering())],
                decoding=replace(plan.decoding, progress=False),
            )["donor"],
            plan.items,
        )
        for direction in plan.config.directions
    }


def scan_unit(model, plan: ScanPlan, unit: str) -> dict[str, Any]:
    """One unit's answers by condition name (``"none"`` adds :func:`donor_shares`)."""
    answers = answer_prompts(
        model, plan.questions.prompts(), plan.conditions(model, unit), decoding=plan.decoding
    )
    out: dict[str, Any] = {"answers": answers}
    if unit == "none":
        out["donors"] = donor_shares(model, plan)
    return out


def steerability_scan(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    config: ScanConfig | None = None,
    *,
    progress: bool = True,
) -> ScanResult:
    """Patch every (site, layer) at the last prompt position from each donor; see the module
    docstring. ``items`` are development questions, ``pool`` the demonstration pool. In one
    process every condition answers from one prompt pass per batch."""
    started = time.perf_counter()
    plan = ScanPlan.of(model, items, pool, config, progress)
    patches = {c.name: c for layer in plan.layers for c in plan.conditions(model, f"layer-{layer}")}
    conditions = plan.conditions(model, "none") + [  # direction by direction, layer by layer
        patches[f"{direction}|{site}|{layer}"]
        for direction in plan.config.directions
        for layer in plan.layers
        for site in plan.config.sites
    ]
    answered = answer_prompts(model, plan.questions.prompts(), conditions, decoding=plan.decoding)
    result = plan.result(model, answered, donor_shares(model, plan))
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def scan_dir(model_name: str, root: Path | None = None) -> Path:
    return cache.stage_dir(model_name, STAGE, root)


def scan_of_questions(directory: Path, items: str | None) -> ScanResult | None:
    """The scan saved in ``directory`` when it asked the development questions whose
    fingerprint is ``items`` (``cache.fingerprint`` of their texts); else None."""
    key = cache.read_stage_config(directory)
    if key is None or items is None or key.get("config", {}).get("items") != items:
        return None
    return ScanResult.load(directory)


def scan_key(
    model, items: Sequence[ConflictItem], pool: Sequence[ConflictItem], config: ScanConfig
) -> dict[str, Any]:
    """What a scan's result depends on (its stage's fingerprint)."""
    return {
        "stage": STAGE,
        "model": model.cfg.model_name,
        "dtype": str(model.cfg.dtype),
        "items": cache.fingerprint([it.question for it in items]),
        "pool": cache.fingerprint([it.question for it in pool]),
        "config": asdict(config),
    }


def cached_scan(
    model,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    config: ScanConfig | None = None,
    *,
    root: Path | None = None,
    progress: bool = True,
) -> ScanResult:
    """:func:`steerability_scan`, cached under ``cache_data/<model>/scan/`` (skipped when the
    model, questions, pool and config are unchanged)."""
    config = config or ScanConfig()
    directory = scan_dir(model.cfg.model_name, root)
    key = scan_key(model, items, pool, config)
    if cache.is_fresh(directory, key):
        logger.info("scan: cached at %s", directory)
        return ScanResult.load(directory)
    result = steerability_scan(model, items, pool, config, progress=progress)
    result.save(directory, key)
    return result


# --------------------------------------------------------------------------------------
# CLI: spare-tl scan CONFIG
# --------------------------------------------------------------------------------------


def scan_table(result: ScanResult) -> str:
    """Plain-text table: per layer, the EM each site's patch reaches in each direction."""
    sites = [s for s in SITES if any(r["site"] == s for r in result.rows)]
    head = "layer " + " ".join(f"{'M<-' + s:>14s}" for s in sites)
    head += " " + " ".join(f"{'C<-' + s:>14s}" for s in sites)
    lines = [head]
    by_key = {(r["direction"], r["site"], r["layer"]): r for r in result.rows}
    for layer in sorted({r["layer"] for r in result.rows}):
        cells = []
        for direction in ("memory", "context"):
            for site in sites:
                r = by_key.get((direction, site, layer))
                cells.append(f"{r[TARGET[direction]]:14.1f}" if r else f"{'-':>14s}")
        lines.append(f"{layer:5d} " + " ".join(cells))
    b = result.baseline
    lines.append(
        f"no patch: EM_C {b['EM_C']:.1f}, EM_M {b['EM_M']:.1f}, neither {b['neither']:.1f} "
        f"({result.n_items} development questions); M<-site: EM_M with the memory donor's "
        "activation, C<-site: EM_C with the context donor's"
    )
    return "\n".join(lines)
