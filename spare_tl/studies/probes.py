"""Detecting the knowledge conflict: the probe study and conditional steering.

The companion study of SpARE (Zhao et al., arXiv 2410.16090) shows that the residual stream
registers a knowledge conflict at mid layers, readable by a linear probe. Here:

- **Probing data** (:mod:`spare_tl.studies.probe_data`): paired conflicting and consistent
  prompts per question, their last-position residuals and SAE codes, split by question.
- **Probes and latents** (:mod:`spare_tl.studies.probe_training`): per-layer L1 probes scored
  on held-out questions, the deployed probe, and the SAE latents that carry the conflict.
- **Conditional steering**: :class:`~spare_tl.methods.conflict_probe.ConflictProbe` is what
  ``steer(..., when="conflict", probe=...)`` runs at its layer during the prompt pass;
  :func:`evaluate_conditional` compares no steering, steering always and steering only
  flagged rows on a mixed set of conflict and no-conflict prompts.
- **The study** (:func:`run_probe_study`): all of it, cached under
  ``cache_data/<model>/probes/``.

``spare-tl probes --layers 6-20`` runs the study for the embedded default
(:mod:`spare_tl.cli.probes`; ``spare-tl docs`` puts its tables into ``docs/results.md``).
The names of the two library modules are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Unpack

from spare_tl import cache
from spare_tl.data.prompts import question_key
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.features import FunctionalFeatures
from spare_tl.generation import Decoding, DecodingOptions
from spare_tl.layer_spec import parse_layers
from spare_tl.methods.conflict_probe import ConflictProbe, GateStats
from spare_tl.stages.activations import check_layers, last_position_resid
from spare_tl.stages.harness import Condition, NoSteering, SpareMethod, answer_prompts
from spare_tl.studies.probe_data import (
    CONFLICT,
    STAGE,
    ProbeDataset,
    _items_hash,
    build_probe_dataset,
    probe_prompts,
    split_by_question,
)
from spare_tl.studies.probe_training import (
    DEFAULT_CS,
    ConflictLatents,
    LayerProbeScores,
    ProbeResults,
    _auroc,
    _mean_std,
    conflict_latents,
    fit_conflict_probe,
    train_probes,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CONDITIONS",
    "GATE_CONDITION_NAMES",
    "DEFAULT_CS",
    "ConditionalResult",
    "ConflictLatents",
    "ConflictProbe",
    "LayerProbeScores",
    "ProbeDataset",
    "ProbeResults",
    "ProbeStudy",
    "build_probe_dataset",
    "conflict_latents",
    "evaluate_conditional",
    "fit_conflict_probe",
    "parse_layers",
    "probe_prompts",
    "run_probe_study",
    "split_by_question",
    "train_probes",
]

CONDITIONS = ("no_steering", "steer_always", "steer_on_conflict")
GATE_CONDITION_NAMES = {
    "no_steering": "no steering",
    "steer_always": "steer always",
    "steer_on_conflict": "steer when the probe flags a conflict",
}
ROW_TYPES = ("conflict", "no_conflict")


# --------------------------------------------------------------------------------------
# Conditional steering on a mixed set
# --------------------------------------------------------------------------------------


@dataclass
class ConditionalResult:
    """Scores by row type (conflict / no conflict) and condition, plus every prediction."""

    summary: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.summary)

    def save(self, path: Path, predictions_path: Path | None = None) -> None:
        cache.write_json(Path(path), self.to_json())
        if predictions_path is not None:
            cache.write_jsonl(Path(predictions_path), self.predictions)

    @classmethod
    def load(cls, path: Path, predictions_path: Path | None = None) -> ConditionalResult:
        preds = cache.read_jsonl(predictions_path) if predictions_path else []
        return cls(summary=cache.read_json(Path(path)), predictions=preds)


def _share(labels: Sequence[str], which: str) -> float:
    return 100.0 * sum(x == which for x in labels) / max(len(labels), 1)


def evaluate_conditional(
    model,
    features: FunctionalFeatures,
    saes: Mapping[int, Any],
    probe: ConflictProbe,
    items: Sequence[ConflictItem],
    pool: Sequence[ConflictItem],
    *,
    direction: Literal["memory", "context"] = "memory",
    edit_strength: float | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n_shots: int = 3,
    demo_type: str = "doo",
    decoding: Decoding | None = None,
    **options: Unpack[DecodingOptions],
) -> ConditionalResult:
    """No steering, steering always and steering only probe-flagged rows, on a mixed set.

    Every item appears twice per seed, with its conflicting and its consistent context and
    the same demonstrations. Reported per row type and condition (%, mean ± std over seeds):
    EM_M (answers M: on no-conflict rows, the accuracy), EM_C (answers C) and neither; and
    how often the probe flags each row type (its own last-position pass).
    """
    dec = Decoding.of(decoding, options)
    if not items:
        raise ValueError("no evaluation items")
    pool_q = {question_key(p) for p in pool}
    leaked = [it.question for it in items if question_key(it) in pool_q]
    if leaked:
        raise ValueError(f"{len(leaked)} evaluation item(s) are pool questions, e.g. {leaked[0]!r}")
    first_edit = features.last_probe_layer(direction)
    if probe.layer > first_edit:
        raise ValueError(
            f"the probe reads layer {probe.layer}, after the first edited layer "
            f"{first_edit}; train it at a layer <= {first_edit}"
        )

    def method_for(cond: str) -> Condition:
        if cond == "no_steering":
            return Condition(cond, NoSteering())
        when = "conflict" if cond == "steer_on_conflict" else "always"
        spare = SpareMethod(
            features,
            saes,
            edit_strength,
            when=when,
            probe=probe if when == "conflict" else None,
            gate_stats=gate_stats,
        )
        return Condition(cond, spare, direction)

    labels: dict[str, dict[str, list[list[str]]]] = {
        rt: {c: [] for c in CONDITIONS} for rt in ROW_TYPES
    }
    flag_rates: dict[str, list[float]] = {rt: [] for rt in ROW_TYPES}
    aurocs: list[float] = []
    gate_stats = GateStats()
    predictions: list[dict[str, Any]] = []
    for seed in seeds:
        data = probe_prompts(items, pool, n_shots=n_shots, demo_type=demo_type, seed=seed)
        row_type = ["conflict" if int(y) == CONFLICT else "no_conflict" for y in data.labels]
        row_item = [items[int(i)] for i in data.item_ids]
        resid = last_position_resid(
            model, data.prompts, [probe.layer], batch_size=dec.batch_size, progress=False
        )[probe.layer]
        score = probe.logits(resid)
        flags = probe.predict(resid).tolist()
        aurocs.append(_auroc(data.labels.numpy(), score.numpy()))
        conditions = [method_for(cond) for cond in CONDITIONS]
        answers = answer_prompts(
            model, data.prompts, conditions, decoding=dec.labelled(f"seed {seed}")
        )
        for rt in ROW_TYPES:
            idx = [i for i, t in enumerate(row_type) if t == rt]
            flag_rates[rt].append(100.0 * sum(flags[i] for i in idx) / max(len(idx), 1))
            for cond in CONDITIONS:
                labels[rt][cond].append(
                    [behaviour_label(answers[cond][i], row_item[i]) for i in idx]
                )
        for i, item in enumerate(row_item):
            predictions.append(
                {
                    "seed": seed,
                    "question": item.question,
                    "row_type": row_type[i],
                    "probe_flag": bool(flags[i]),
                    "probe_logit": float(score[i]),
                    "org_answer": list(item.org_answer),
                    "sub_answer": list(item.sub_answer),
                    **{f"{c}.prediction": answers[c][i] for c in CONDITIONS},
                    **{f"{c}.label": behaviour_label(answers[c][i], item) for c in CONDITIONS},
                }
            )

    summary: dict[str, Any] = {
        "model": model.cfg.model_name,
        "n_items": len(items),
        "seeds": list(seeds),
        "direction": direction,
        "demo_type": demo_type,
        "n_shots": n_shots,
        "edit_strength": features.strength(direction) if edit_strength is None else edit_strength,
        "feature_layers": features.edit_layers(direction),
        "probe": {"layer": probe.layer, "threshold": probe.threshold, "C": probe.C},
    }
    for rt in ROW_TYPES:
        summary[rt] = {}
        for cond in CONDITIONS:
            per_seed = labels[rt][cond]
            entry: dict[str, Any] = {}
            for metric, which in (("EM_M", "memory"), ("EM_C", "context"), ("neither", "neither")):
                values = [_share(x, which) for x in per_seed]
                mean, std = _mean_std(values)
                entry[metric], entry[f"{metric}_std"] = mean, std
                entry.setdefault("per_seed", {})[metric] = values
            summary[rt][cond] = entry
    rate_c, rate_n = _mean_std(flag_rates["conflict"]), _mean_std(flag_rates["no_conflict"])
    summary["probe_on_eval"] = {
        "flagged_conflict": rate_c[0],
        "flagged_conflict_std": rate_c[1],
        "flagged_no_conflict": rate_n[0],
        "flagged_no_conflict_std": rate_n[1],
        "auroc": _mean_std(aurocs)[0],
        "auroc_std": _mean_std(aurocs)[1],
        "gate_rows": gate_stats.rows,
        "gate_flagged": gate_stats.flagged,
    }
    target = "EM_M" if direction == "memory" else "EM_C"
    nc, c = summary["no_conflict"], summary["conflict"]
    drop = nc["no_steering"]["EM_M"] - nc["steer_on_conflict"]["EM_M"]
    summary["checks"] = {
        "target_metric_on_conflict_rows": target,
        "conflict_gain_always": c["steer_always"][target] - c["no_steering"][target],
        "conflict_gain_conditional": c["steer_on_conflict"][target] - c["no_steering"][target],
        "no_conflict_accuracy_drop_always": nc["no_steering"]["EM_M"] - nc["steer_always"]["EM_M"],
        "no_conflict_accuracy_drop_conditional": drop,
        "no_conflict_within_2_points": bool(abs(drop) <= 2.0),
    }
    return ConditionalResult(summary=summary, predictions=predictions)


# --------------------------------------------------------------------------------------
# The whole study
# --------------------------------------------------------------------------------------


@dataclass
class ProbeStudy:
    """Everything :func:`run_probe_study` produced (typed; the Markdown table that the
    command prints is :func:`spare_tl.cli.probes.study_table`)."""

    dataset: ProbeDataset
    resid: ProbeResults
    sae: ProbeResults | None
    probe: ConflictProbe
    latents: dict[int, ConflictLatents]
    conditional: ConditionalResult | None
    directory: Path


def _fresh_json(directory: Path, config: Mapping[str, Any], name: str) -> Any | None:
    if cache.is_fresh(directory, config) and (directory / name).exists():
        return cache.read_json(directory / name)
    return None


def run_probe_study(
    model,
    features: FunctionalFeatures,
    saes: Mapping[int, Any],
    pool: Sequence[ConflictItem],
    evaluation: Sequence[ConflictItem],
    *,
    layers: Sequence[int],
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    test_fraction: float = 0.25,
    n_shots: int = 3,
    demo_type: str = "doo",
    demo_seed: int = 0,
    n_demo_sets: int = 1,
    probe_layer: int | None = None,
    threshold: float = 0.5,
    top_n: int = 20,
    conditional: bool = True,
    n_items: int = 100,
    probe_items: int = 0,
    eval_seeds: Sequence[int] = (0, 1, 2),
    direction: Literal["memory", "context"] = "memory",
    batch_size: int = 16,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ProbeStudy:
    """The whole study: probe data from the pool (development) questions (plus ``probe_items``), residual and SAE
    probes per layer, the deployed probe (best residual layer ≤ the first edited layer,
    refitted on every probe question), conflict latents at the feature layers, and
    conditional steering on held-out questions. Stages are cached under
    ``cache_data/<model>/probes/``.

    ``probe_items`` adds that many held-out questions to the probe data, taken from the
    *end* of ``evaluation``; the conditional-steering items are its first ``n_items``, and
    the two never overlap (demonstrations always come from the pool).
    """
    directory = cache.stage_dir(model.cfg.model_name, STAGE, cache_root)
    layers = check_layers(model, layers)
    if probe_items < 0:
        raise ValueError(f"probe_items must be >= 0, got {probe_items}")
    if probe_items and n_items + probe_items > len(evaluation):
        raise ValueError(
            f"{n_items} conditional-steering items + {probe_items} probe items exceed the "
            f"{len(evaluation)} held-out questions; lower --probe-items or --n-items"
        )
    probe_questions = list(pool) + (list(evaluation[-probe_items:]) if probe_items else [])
    first_edit = features.last_probe_layer(direction)
    sae_layers = sorted(k for k in saes if k in layers)
    dataset = build_probe_dataset(
        model,
        probe_questions,
        pool,
        layers,
        n_shots=n_shots,
        demo_type=demo_type,
        seed=demo_seed,
        n_demo_sets=n_demo_sets,
        saes={k: saes[k] for k in sae_layers},
        batch_size=batch_size,
        cache_root=cache_root,
        use_cache=use_cache,
        progress=progress,
    )
    train_cfg = {"dataset": cache.fingerprint(dataset.config), "seeds": list(seeds)}
    train_cfg |= {"test_fraction": test_fraction, "Cs": list(DEFAULT_CS)}
    results: dict[str, ProbeResults | None] = {}
    for kind in ("resid", "sae"):
        if kind == "sae" and not dataset.sae_layers:
            results[kind] = None
            continue
        sub = directory / kind
        config = {"stage": f"{STAGE}/{kind}", **train_cfg}
        cached = _fresh_json(sub, config, "results.json") if use_cache else None
        if cached is not None:
            results[kind] = ProbeResults.from_json(cached)
            continue
        res = train_probes(
            dataset, seeds=seeds, test_fraction=test_fraction, features=kind, progress=progress
        )  # type: ignore[arg-type]
        cache.begin_stage(sub)
        res.save(sub / "results.json")
        cache.mark_complete(sub, config)
        results[kind] = res
    resid_results = results["resid"]
    assert resid_results is not None
    if probe_layer is None:
        probe_layer = resid_results.best_layer(max_layer=first_edit)
    if probe_layer > first_edit:
        raise ValueError(
            f"probe layer {probe_layer} is after the first edited layer {first_edit}: "
            "conditional steering must decide before it edits"
        )
    probe = fit_conflict_probe(dataset, probe_layer, threshold=threshold, seed=0)
    probe.save(directory / "conflict_probe")
    logger.info("conflict probe at layer %d (C %s)", probe.layer, probe.C)

    steered = features.for_direction(direction)  # the set conditional steering uses
    latents = {
        layer: conflict_latents(dataset, layer, steered, top_n=top_n)
        for layer in sorted(steered.layers)
        if layer in dataset.sae_layers
    }
    cache.write_json(directory / "latents.json", {str(k): v.to_json() for k, v in latents.items()})

    cond_result = None
    if conditional:
        items = list(evaluation[:n_items])
        cond_cfg = {
            "stage": f"{STAGE}/conditional",
            "model": model.cfg.model_name,
            "items": _items_hash(items),
            "pool": _items_hash(pool),
            "probe": cache.fingerprint(
                {"w": probe.weight.tolist(), "b": probe.bias, "t": probe.threshold}
            ),
            "features": cache.fingerprint(
                {
                    "layers": steered.counts(),
                    "alpha": features.strength(direction),
                    "ids": {
                        k: f.context_features.tolist() + f.memory_features.tolist()
                        for k, f in steered.layers.items()
                    },
                }
            ),
            "seeds": list(eval_seeds),
            "direction": direction,
            "n_shots": n_shots,
            "demo_type": demo_type,
        }
        sub = directory / "conditional"
        cached = _fresh_json(sub, cond_cfg, "results.json") if use_cache else None
        if cached is not None:
            cond_result = ConditionalResult(summary=cached)
        else:
            cond_result = evaluate_conditional(
                model,
                features,
                saes,
                probe,
                items,
                pool,
                direction=direction,
                seeds=eval_seeds,
                n_shots=n_shots,
                demo_type=demo_type,
                batch_size=batch_size,
                progress=progress,
            )
            cache.begin_stage(sub)
            cond_result.save(sub / "results.json", sub / "predictions.jsonl")
            cache.mark_complete(sub, cond_cfg)
    return ProbeStudy(
        dataset=dataset,
        resid=resid_results,
        sae=results["sae"],
        probe=probe,
        latents=latents,
        conditional=cond_result,
        directory=directory,
    )
