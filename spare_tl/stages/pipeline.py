"""All SpARE stages from one config (TOML or YAML), each skipped when its inputs are unchanged.

model + SAEs → dataset → memorised set → pool split → behaviours (grouped prompts) → activations
    → feature statistics → functional features → evaluation
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from spare_tl import cache, distributed
from spare_tl.checks import at_least
from spare_tl.distributed import Ranks
from spare_tl.embedded import EMBEDDED_MODEL
from spare_tl.features import DirectionSetting
from spare_tl.saes import DEFAULT_SITE, check_latent_code, check_site
from spare_tl.stages.behaviours import BehaviourConfig
from spare_tl.stages.evaluation import EvaluationConfig

if TYPE_CHECKING:
    from spare_tl.features import FunctionalFeatures
    from spare_tl.stages.activations import Activations
    from spare_tl.stages.attribution import LayerAttribution
    from spare_tl.stages.statistics import LayerStatistics

logger = logging.getLogger(__name__)

#: the keys of the one-setting-for-both-directions config, now in [to_context] / [to_memory]
MOVED_KEYS = (
    "proportion",
    "edit_strength",
    "edit_strength_to_memory",
    "feature_layers",
    "feature_site",
    "selection",
)

STAGES = ("memorised", "behaviours", "activations", "statistics", "features", "evaluate")


@dataclass
class PipelineConfig:
    """Everything a SpARE run needs; every field has a default for the embedded model."""

    model: str = EMBEDDED_MODEL
    dataset: str = "builtin"
    saes: str = ""  # folder with one SAELens SAE folder per hook (blocks.<l>.hook_resid_post)
    layers: list[int] = field(default_factory=list)
    memorised_shots: int = 4
    memorised_seed: int = 0
    pool_size: int = 128
    pool_seed: int = 42
    behaviours: BehaviourConfig = field(default_factory=BehaviourConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    n_eval_items: int | None = None
    features_dir: str = ""  # where the functional features go (default: cache stage dir)
    cache_root: str = ""
    batch_size: int = 16
    mi_seed: int = 0
    #: the SAE code the statistics are computed on (both directions' features use it):
    #: "encode" (the SAE's own) or "relu_pre" (TopK, before the cut)
    latent_code: str = "encode"
    #: how steering to context edits: site, layers (default: every candidate layer ``layers``,
    #: which are the layers whose activations and statistics are computed), K, α and the
    #: selection (``"mi"``: mutual information, the paper; ``"attribution"``; ``"both"``);
    #: the TOML table ``[to_context]``
    to_context: DirectionSetting = field(default_factory=DirectionSetting)
    #: how steering to memory edits (``[to_memory]``); fields it leaves unset are
    #: ``to_context``'s. Different features than to context give a separate set
    #: (FunctionalFeatures.to_memory); None: to memory as to context
    to_memory: DirectionSetting | None = None
    #: candidate layers at other sites, e.g. ``{attn_out = [19, 20, 21]}``: their activations
    #: and statistics are computed too (SAEs ``blocks.<l>.hook_<site>`` in ``saes``)
    site_layers: dict[str, list[int]] = field(default_factory=dict)

    def candidate_layers(self, site: str = DEFAULT_SITE) -> list[int]:
        """The candidate layers at ``site``."""
        return list(self.layers) if site == DEFAULT_SITE else list(self.site_layers.get(site, []))

    def __post_init__(self) -> None:
        if isinstance(self.behaviours, dict):
            self.behaviours = BehaviourConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in self.behaviours.items()}
            )
        if isinstance(self.evaluation, dict):
            self.evaluation = EvaluationConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in self.evaluation.items()}
            )
        # both directions' features use the statistics' code, so the settings take it
        check_latent_code(self.latent_code)
        code = DirectionSetting(latent_code=self.latent_code)
        if isinstance(self.to_context, Mapping):
            self.to_context = DirectionSetting.from_mapping(
                self.to_context, code, name="to_context"
            )
        elif isinstance(self.to_context, DirectionSetting):
            self.to_context = replace(self.to_context, latent_code=self.latent_code)
        if isinstance(self.to_memory, Mapping):
            self.to_memory = DirectionSetting.from_mapping(
                self.to_memory, self.to_context, name="to_memory"
            )
        elif isinstance(self.to_memory, DirectionSetting):
            self.to_memory = replace(self.to_memory, latent_code=self.latent_code)
        self.validate()

    def validate(self) -> None:
        """Catch a wrong configuration before any long work (each direction's setting checked
        its own values when it was made)."""
        for name in ("memorised_shots", "memorised_seed", "pool_seed", "mi_seed"):
            at_least(getattr(self, name), 0, name)
        at_least(self.batch_size, 1, "batch_size")
        if self.n_eval_items is not None:
            at_least(self.n_eval_items, 1, "n_eval_items")
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError("dataset is empty: 'builtin', 'nqswap', 'macnoise' or a .jsonl path")
        b = self.behaviours
        for name in ("shots", "seeds", "demo_types"):
            if not getattr(b, name):
                raise ValueError(f"behaviours.{name} is empty: give at least one")
        for k in b.shots:
            at_least(k, 1, "behaviours.shots")
        at_least(b.max_new_tokens, 1, "behaviours.max_new_tokens")
        at_least(b.batch_size, 1, "behaviours.batch_size")
        e = self.evaluation
        if not e.seeds:
            raise ValueError("evaluation.seeds is empty: give at least one seed")
        at_least(e.n_shots, 0, "evaluation.n_shots")
        at_least(e.max_new_tokens, 1, "evaluation.max_new_tokens")
        at_least(e.batch_size, 1, "evaluation.batch_size")
        for site, layers in self.site_layers.items():
            check_site(site)
            if site == DEFAULT_SITE:
                raise ValueError("site_layers lists other sites; put residual layers in 'layers'")
            if not layers:
                raise ValueError(f"site_layers.{site} is empty: give its candidate layers")
        for name in ("to_context", "to_memory"):
            setting = getattr(self, name)
            if setting is None:
                continue
            if not isinstance(setting, DirectionSetting):
                raise ValueError(f"{name} must be a table of {list(DirectionSetting.KEYS)}")
            candidates = self.candidate_layers(setting.site)
            outside = sorted(set(setting.layers) - set(candidates))
            if (candidates or setting.site != DEFAULT_SITE) and outside:
                raise ValueError(
                    f"{name} layers {outside} are not among the {setting.site} candidate "
                    f"layers {candidates}"
                )
            if setting.site != DEFAULT_SITE and not setting.layers:
                raise ValueError(f"{name} site {setting.site!r} needs its layers")
        at_least(self.pool_size, 2, "pool_size")
        for t in self.behaviours.demo_types:
            if t not in ("dss", "dso", "doo"):
                raise ValueError(f"behaviours.demo_types: unknown type {t!r} (dss, dso, doo)")

    @classmethod
    def from_file(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config file at {path}")
        if path.is_dir():
            raise ValueError(f"config {path} is a directory; give a .toml or .yaml file")
        if path.suffix == ".toml":
            try:
                raw = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config {path} is not valid TOML: {e}") from e
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"config {path} is not valid YAML: {e}") from e
        else:
            raise ValueError(f"config {path} must be .toml or .yaml")
        if not isinstance(raw, dict):
            raise ValueError(f"config {path} must be a mapping of keys to values")
        moved = sorted(set(raw) & set(MOVED_KEYS))
        if moved:
            raise ValueError(
                f"config {path}: {moved} are set per direction now: write them in a "
                "[to_context] table (feature_layers -> layers, feature_site -> site) and what "
                "differs to memory in [to_memory] (edit_strength_to_memory -> edit_strength), "
                "e.g. [to_context] layers = [10, 11], proportion = 0.2, edit_strength = 6.0 "
                "and [to_memory] edit_strength = 4.0, one key a line"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} in {path}; known: {sorted(known)}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as e:  # TypeError: an unknown key in [behaviours]
            raise ValueError(f"config {path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("to_context", "to_memory"):
            setting = getattr(self, name)
            out[name] = setting.record() if setting is not None else None
        return out

    def direction_settings(self) -> dict[str, DirectionSetting]:
        """Per direction, the setting its feature set is chosen with, its layers filled in
        (a setting naming none takes every candidate layer at its site)."""
        memory = self.to_memory if self.to_memory is not None else self.to_context
        out = {}
        for direction, setting in (("context", self.to_context), ("memory", memory)):
            if not setting.layers:
                setting = replace(setting, layers=tuple(self.candidate_layers(setting.site)))
            out[direction] = setting
        return out

    def attribution_layers(self) -> dict[str, list[int]]:
        """Per site, the layers whose attribution the chosen selections need."""
        out: dict[str, set[int]] = {}
        for setting in self.direction_settings().values():
            if setting.selection != "mi":
                out.setdefault(setting.site, set()).update(setting.layers)
        return {site: sorted(layers) for site, layers in out.items()}

    def features_metadata(self) -> dict[str, Any]:
        """What the functional features record about the run that made them."""
        return {
            "dataset": self.dataset,
            "pool_size": self.pool_size,
            "pool_seed": self.pool_seed,
            "saes": self.saes,
        }


@dataclass
class PipelineResult:
    memorised: Any = None
    split: Any = None
    grouped: Any = None
    activations: Any = None
    statistics: Any = None  # residual statistics by layer
    #: statistics by site, then layer (the residual's are ``statistics``)
    site_statistics: dict[str, Any] = field(default_factory=dict)
    #: every SAE loaded, keyed by hook name (``blocks.23.hook_attn_out``)
    saes: dict[str, Any] = field(default_factory=dict)
    #: attribution by site, then layer (only when a selection needs it)
    attribution: dict[str, Any] = field(default_factory=dict)
    features: Any = None
    evaluation: Any = None


def features_from_config(
    config: PipelineConfig,
    statistics: Mapping[int, Any],
    model_name: str,
    site_statistics: Mapping[str, Mapping[int, Any]] | None = None,
    attribution: Mapping[str, Mapping[int, LayerAttribution]] | None = None,
) -> FunctionalFeatures:
    """The functional-feature set ``config`` describes, from per-layer ``statistics`` (the
    residual's), ``site_statistics`` (other sites') and, for a selection by attribution,
    ``attribution`` (by site, then layer)."""
    from spare_tl.stages.selection import directional_features

    settings = config.direction_settings()
    return directional_features(
        {DEFAULT_SITE: statistics, **(site_statistics or {})},
        model_name=model_name,
        context=settings["context"],
        memory=settings["memory"],
        metadata=config.features_metadata(),
        attribution=attribution,
    )


def run_pipeline(
    config: PipelineConfig,
    *,
    until: str = "evaluate",
    model=None,
    saes=None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> PipelineResult:
    """Run the stages up to ``until`` (one of :data:`STAGES`), reusing cached results.

    Under ``torchrun`` (``ranks``, default this process's, in a world of more than one) the
    memorised set, grouping and activations are split across ranks
    (:mod:`spare_tl.stages.sharded`, :mod:`spare_tl.stages.sharded_pipeline`); the
    statistics, attribution and features are computed by rank 0 first and read from its
    cache by the others; the evaluation is not split here (use ``spare-tl evaluate``)."""
    from spare_tl.data.datasets import load_dataset
    from spare_tl.data.prompts import split_pool
    from spare_tl.models import load_model
    from spare_tl.saes import load_saes_for_layers, site_hook_name
    from spare_tl.stages.activations import collect_activations
    from spare_tl.stages.behaviours import group_prompts
    from spare_tl.stages.evaluation import evaluate
    from spare_tl.stages.memorised import find_memorised
    from spare_tl.stages.statistics import feature_statistics

    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}: one of {STAGES}")
    stop = STAGES.index(until)
    ranks = ranks or distributed.ranks()
    if ranks.distributed and until == "evaluate":
        raise ValueError(
            "the pipeline's evaluation is not split across ranks: run the stages up to "
            "`features` under torchrun, then `torchrun ... -m spare_tl.cli evaluate`"
        )
    # the memorised set, grouping and activations: split across ranks under torchrun (the
    # split versions take the same arguments, less the progress bar)
    find, group, collect = find_memorised, group_prompts, collect_activations
    local: dict[str, Any] = {"progress": progress}
    if ranks.distributed:
        from spare_tl.stages.sharded import find_memorised_sharded
        from spare_tl.stages.sharded_pipeline import (
            collect_activations_sharded,
            group_prompts_sharded,
        )

        find, group, collect = (  # type: ignore[assignment]
            find_memorised_sharded,
            group_prompts_sharded,
            collect_activations_sharded,
        )
        local = {}
    root = Path(config.cache_root) if config.cache_root else None
    out = PipelineResult()
    model = model if model is not None else load_model(config.model)
    if stop >= STAGES.index("statistics"):
        # check layers and SAEs up front, before any long work
        from spare_tl.stages.activations import check_layers

        check_layers(model, config.layers)
        if saes is None:
            if not config.saes:
                raise ValueError("config.saes is empty: point it to a folder of SAEs per hook")
            saes = load_saes_for_layers(model, config.saes, config.layers)
        else:
            saes = load_saes_for_layers(model, saes, config.layers)
        site_saes = {DEFAULT_SITE: saes}
        for site, layers in config.site_layers.items():
            check_layers(model, layers)
            site_saes[site] = load_saes_for_layers(model, config.saes, layers, site=site)
        out.saes = {
            site_hook_name(layer, site): sae
            for site, by_layer in site_saes.items()
            for layer, sae in by_layer.items()
        }
    items = load_dataset(config.dataset)
    dataset_name = config.dataset.replace("/", "_")
    out.memorised = find(
        model,
        items,
        dataset_name=dataset_name,
        n_shots=config.memorised_shots,
        seed=config.memorised_seed,
        batch_size=max(config.batch_size, 16),
        cache_root=root,
        **local,
    )
    known = out.memorised.filter(items)
    logger.info("memorised: %d of %d items", len(known), len(items))
    if stop == 0:
        return out
    out.memorised.require(config.pool_size)
    out.split = split_pool(known, config.pool_size, config.pool_seed)
    out.grouped = group(model, out.split.pool, config.behaviours, cache_root=root, **local)
    if stop == 1:
        return out

    def activations_at(site: str, layers: Sequence[int]) -> Activations:
        return collect(
            model,
            out.grouped,
            layers,
            batch_size=config.batch_size,
            cache_root=root,
            site=site,
            **local,
        )

    def statistics_of(
        activations: Activations, layer_saes: Mapping[Any, Any]
    ) -> dict[int, LayerStatistics]:
        return distributed.main_first(  # under torchrun: rank 0 caches, the others read
            lambda: feature_statistics(
                model,
                activations,
                layer_saes,
                seed=config.mi_seed,
                latent_code=config.latent_code,
                cache_root=root,
                progress=progress,
            ),
            ranks,
        )

    out.activations = activations_at(DEFAULT_SITE, config.layers)
    if stop == 2:
        return out
    out.statistics = statistics_of(out.activations, saes)
    out.site_statistics = {DEFAULT_SITE: out.statistics}
    for site, layers in config.site_layers.items():
        out.site_statistics[site] = statistics_of(activations_at(site, layers), site_saes[site])
    if stop == 3:
        return out
    if config.attribution_layers():
        from spare_tl.stages.attribution import attribution_by_site

        out.attribution = distributed.main_first(
            lambda: attribution_by_site(
                model,
                out.grouped,
                out.site_statistics,
                out.saes,
                config.attribution_layers(),
                batch_size=config.batch_size,
                cache_root=root,
                progress=progress,
            ),
            ranks,
        )
    out.features = features_from_config(
        config, out.statistics, model.cfg.model_name, out.site_statistics, out.attribution
    )
    features_dir = (
        Path(config.features_dir)
        if config.features_dir
        else cache.stage_dir(model.cfg.model_name, "functional_features", root)
    )
    if ranks.is_main:
        out.features.save(features_dir)
    if stop == 4:
        return out
    evaluation_items = out.split.test
    if config.n_eval_items:
        evaluation_items = evaluation_items[: config.n_eval_items]
    out.evaluation = evaluate(
        model,
        evaluation_items,
        out.split.pool,
        features=out.features,
        saes=out.saes,
        config=config.evaluation,
        dataset_name=config.dataset,
        progress=progress,
    )
    return out
