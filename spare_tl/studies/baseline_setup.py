"""What the baselines are built from: the model, SpARE's features and SAEs, the pool and the
held-out questions (:class:`BaselineSetup`), and the steering vectors fitted on the pool.

:func:`actadd_vectors` (μ_C − μ_M of SpARE's grouped prompts, from the cached activations
when they fit) and :func:`task_vectors` (mean last-position residual of ICL prompts) run the
model; their pure parts are in :mod:`spare_tl.methods.baselines`. :meth:`BaselineSetup.make`
builds one method from one setting, :meth:`BaselineSetup.method` a method with its dev-best
setting per direction (:func:`spare_tl.studies.baseline_sweep.best_hyperparameters`), and
:meth:`BaselineSetup.grid` the candidates of a development sweep.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from spare_tl import cache
from spare_tl.data.schema import ConflictItem
from spare_tl.methods.base import NoSteering, SteeringMethod
from spare_tl.methods.baselines import (
    CAD,
    ICL,
    TASK_VECTOR_PROMPTS,
    ActAdd,
    ClosedBook,
    PerDirection,
    TaskVector,
    mean_difference,
    task_vector_prompts,
)
from spare_tl.methods.hooks import DIRECTIONS
from spare_tl.methods.spare import SpareMethod
from spare_tl.saes import DEFAULT_SITE, check_site
from spare_tl.studies.baseline_sweep import best_hyperparameters, sweep_path

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_COEFFICIENTS",
    "METHODS",
    "BaselineSetup",
    "actadd_vectors",
    "task_vectors",
]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("none", "closed_book", "spare", "icl", "actadd", "taskvec", "cad")
DEFAULT_COEFFICIENTS = (0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0)
#: the cache stage of the ActAdd mean differences (every layer of one site)
ACTADD_STAGE = "actadd_vectors"
ACTADD_FILE = "vectors.safetensors"


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
    these layers and were made from ``grouped`` (or ``grouped`` is None). Otherwise the kept
    grouped prompts run once for **every** layer, and the vectors (a few KB) are cached in
    ``cache_data/<model>/actadd_vectors[_<site>]/`` keyed by the grouped prompts, the site and
    the model's dtype, so a later table or sweep reads them instead of re-running the prompts.
    """
    from spare_tl.stages.activations import (
        Activations,
        check_layers,
        last_position_resid,
        stage_name,
    )
    from spare_tl.stages.behaviours import require_groups

    layers = check_layers(model, list(layers))
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
            "run `spare-tl behaviours CONFIG` (and `spare-tl activations CONFIG`) first"
        )
    require_groups(grouped)
    vectors_dir = cache.stage_dir(model.cfg.model_name, stage_name(ACTADD_STAGE, site), cache_root)
    config = {
        "stage": ACTADD_STAGE,
        "model": model.cfg.model_name,
        "site": site,
        "grouped_hash": expected,
        "dtype": str(model.cfg.dtype),
        "batch_size": batch_size,
    }
    if not cache.is_fresh(vectors_dir, config):
        resid = last_position_resid(
            model,
            prompts,
            list(range(model.cfg.n_layers)),
            site=site,
            batch_size=batch_size,
            progress=progress,
        )
        every = mean_difference(resid, labels)
        cache.begin_stage(vectors_dir)
        cache.write_tensors(
            vectors_dir / ACTADD_FILE, {f"layer.{layer}": v for layer, v in every.items()}
        )
        cache.mark_complete(vectors_dir, config, files=[ACTADD_FILE])
    else:
        logger.info("ActAdd vectors from %s", vectors_dir)
    stored = cache.read_tensors(vectors_dir / ACTADD_FILE)
    return {layer: stored[f"layer.{layer}"] for layer in layers}


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
    from spare_tl.stages.activations import last_position_resid

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


@dataclass
class BaselineSetup:
    """Everything the methods are built from: model, SpARE's features and SAEs, the
    demonstration pool, the development questions (sweeps) and the test questions; steering
    vectors are computed on demand."""

    model: Any
    features: Any
    saes: Mapping[Any, Any]
    pool: list[ConflictItem]
    development: list[ConflictItem]
    test: list[ConflictItem]
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
        from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
        from spare_tl.stages.memorised import memorised_split

        model, features, saes = load_steering_setup(
            features_dir or DEFAULT_FEATURES, saes_dir or DEFAULT_SAES, model=model
        )
        split = memorised_split(model, features, dataset, pool_size=pool_size or None)
        return cls(
            model,
            features,
            saes,
            list(split.pool),
            list(split.development),
            list(split.test),
            dataset,
        )

    def _grouped(self):
        if self.grouped is None:
            from spare_tl.stages.behaviours import GroupedPrompts, behaviours_dir

            directory = behaviours_dir(self.model.cfg.model_name, self.cache_root)
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
        if name == "closed_book":
            return ClosedBook()
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
        if name in ("none", "closed_book", "icl", "spare"):
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
        if name in ("none", "closed_book", "icl"):
            return [self.make(name)]
        raise ValueError(
            f"no baseline sweep for {name!r}: SpARE has its own (`spare-tl sweep`, "
            "spare_tl.stages.sweep)"
        )


def _site_set(spec: Sequence[int] | tuple[str, Sequence[int]]) -> tuple[str, list[int]]:
    """A layer set, or a (site, layer set) pair, as (site, layers)."""
    if len(spec) == 2 and isinstance(spec[0], str):
        return check_site(spec[0]), [int(x) for x in spec[1]]  # type: ignore[union-attr]
    return DEFAULT_SITE, [int(x) for x in spec]  # type: ignore[union-attr]
