"""The behaviours stage: group conflict prompts by the behaviour the model shows on them.

For every pool question and every (shots, seed, demonstration type) the conflict prompt is
answered greedily and labelled **context** (EM with C = ``sub_answer``), **memory** (EM with
M = ``org_answer``) or **neither** (dropped later). The teacher-forced NLL of both answers
(``nll_context`` = the paper's ``ss_loss``, ``nll_memory`` = ``so_loss``) gives the
confidence weights. Work is done in units of (shots, seed, type); each finished unit is
appended to a resume log (``partial.jsonl``), so a killed run resumes where it stopped. On
resume a unit counts as done only when the log holds exactly one record for every pool
question; a unit a crash cut short is redone, and the finished records come out in the
same order as an uninterrupted run's.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.data.prompts import conflict_prompt, sample_demonstrations
from spare_tl.data.schema import ConflictItem, items_hash
from spare_tl.data.scoring import behaviour_label
from spare_tl.errors import CacheError
from spare_tl.generation import generate_and_score

logger = logging.getLogger(__name__)
#: the stage's name: its module, its TOML section ``[behaviours]``, its command
#: ``spare-tl behaviours`` and its cache folder ``cache_data/<model>/behaviours/``
STAGE = "behaviours"
#: the folder's name before it was the stage's (:func:`behaviours_dir` moves one found)
LEGACY_STAGE = "grouped_prompts"
#: what the stage's config.json records as its stage: part of its cache key, so it keeps the
#: old name (the cached prompts stay valid)
CONFIG_STAGE = "grouped_prompts"
LABELS = ("context", "memory", "neither")


@dataclass(frozen=True)
class BehaviourConfig:
    """Which prompts to build over the pool: shots x seeds x demonstration types."""

    shots: tuple[int, ...] = (3, 4, 5)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    demo_types: tuple[str, ...] = ("dss", "dso", "doo")
    max_new_tokens: int = 12
    batch_size: int = 16

    def units(self) -> list[tuple[int, int, str]]:
        return [(k, s, t) for k in self.shots for s in self.seeds for t in self.demo_types]


@dataclass
class GroupedPrompts:
    """Prompts with the model's answer, behaviour label and answer NLLs."""

    model_name: str
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def group(self, label: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["label"] == label]

    def counts(self) -> dict[str, int]:
        c = Counter(r["label"] for r in self.records)
        return {label: c.get(label, 0) for label in LABELS}

    def table(self) -> list[dict[str, Any]]:
        """Share of context / memory / neither answers by demonstration type and shots."""
        keys = sorted({(r["demo_type"], r["shots"]) for r in self.records})
        rows = []
        for demo_type, shots in keys:
            sel = [r for r in self.records if r["demo_type"] == demo_type and r["shots"] == shots]
            c = Counter(r["label"] for r in sel)
            rows.append(
                {
                    "demo_type": demo_type,
                    "shots": shots,
                    "n": len(sel),
                    **{label: 100.0 * c.get(label, 0) / len(sel) for label in LABELS},
                }
            )
        return rows

    def labelled(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Prompts of the two kept groups, labels (1 context, 0 memory) and confidence weights."""
        kept = [r for r in self.records if r["label"] in ("context", "memory")]
        labels = torch.tensor([1 if r["label"] == "context" else 0 for r in kept])
        weights = torch.tensor([confidence_weight(r) for r in kept], dtype=torch.float64)
        return [r["prompt"] for r in kept], labels, weights

    def stage_files(self) -> dict[str, Callable[[Path], None]]:
        """The stage's files as ``{name: atomic writer of that file's path}``."""
        return {"records.jsonl": lambda p: cache.write_jsonl(p, self.records)}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        cache.begin_stage(directory)
        files = self.stage_files()
        for name, write in files.items():
            write(directory / name)
        cache.mark_complete(directory, self.config, files=list(files), counts=self.counts())

    @classmethod
    def load(cls, directory: Path) -> GroupedPrompts:
        """Load a completed stage, its files checked against the manifest first."""
        directory = Path(directory)
        meta = cache.verify_stage(directory)
        return cls(
            model_name=meta["config"]["model"],
            records=cache.read_jsonl(directory / "records.jsonl"),
            config=meta["config"],
        )


def confidence_weight(record: dict[str, Any]) -> float:
    """The paper's confidence in the observed behaviour: so/(ss+so) for context, ss/(ss+so)
    for memory, where ss/so are the NLLs of the context/memory answer."""
    ss, so = record["nll_context"], record["nll_memory"]
    total = ss + so
    if total <= 0:
        return 0.5
    return so / total if record["label"] == "context" else ss / total


def _unit_key(shots: int, seed: int, demo_type: str) -> str:
    return f"{shots}shot-seed{seed}-{demo_type}"


def behaviours_config(
    model, pool: Sequence[ConflictItem], config: BehaviourConfig
) -> dict[str, Any]:
    """The stage's config (its cache key); checks that the pool fits ``config``."""
    if not pool:
        raise ValueError("the demonstration pool is empty: find the memorised set first")
    if max(config.shots) >= len(pool):
        raise ValueError(f"{max(config.shots)} shots need a pool larger than {len(pool)} items")
    return {
        "stage": CONFIG_STAGE,
        "model": model.cfg.model_name,
        "pool_hash": cache.fingerprint({"q": [it.question for it in pool]}),
        "pool_items_hash": items_hash(pool),
        "n_pool": len(pool),
        **asdict(config),
    }


def unit_prompts(
    pool: Sequence[ConflictItem], shots: int, seed: int, demo_type: str
) -> tuple[list[str], list[list[ConflictItem]]]:
    """The conflict prompt of every pool question in one unit, and its demonstrations."""
    prompts, demos_of = [], []
    for idx, item in enumerate(pool):
        demos = sample_demonstrations(pool, shots, seed=seed * 100_003 + idx, exclude=item)
        prompts.append(conflict_prompt(item, demos, demo_type))
        demos_of.append(demos)
    return prompts, demos_of


def answer_unit_rows(
    model,
    pool: Sequence[ConflictItem],
    unit: tuple[int, int, str],
    rows: Sequence[int],
    config: BehaviourConfig,
) -> list[dict[str, Any]]:
    """The records of the pool questions ``rows`` in one unit (shots, seed, demonstration
    type), answered in one call: ``rows`` in the length order of the unit's prompts, so
    any run of whole batches is batched as when the unit is answered at once."""
    shots, seed, demo_type = unit
    prompts, demos_of = unit_prompts(pool, shots, seed, demo_type)
    answers, nll = generate_and_score(
        model,
        [prompts[i] for i in rows],
        [[pool[i].sub_answer[0], pool[i].org_answer[0]] for i in rows],
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        progress=False,
    )
    records = []
    for j, (idx, answer) in enumerate(zip(rows, answers)):
        item = pool[idx]
        records.append(
            {
                "unit": _unit_key(*unit),
                "pool_index": idx,
                "question": item.question,
                "relation": item.relation,
                "shots": shots,
                "seed": seed,
                "demo_type": demo_type,
                "demonstrations": [d.question for d in demos_of[idx]],
                "prompt": prompts[idx],
                "prediction": answer,
                "sub_answer": list(item.sub_answer),
                "org_answer": list(item.org_answer),
                "label": behaviour_label(answer, item),
                "nll_context": float(nll[j, 0]),
                "nll_memory": float(nll[j, 1]),
            }
        )
    return records


def in_unit_order(records: list[dict[str, Any]], config: BehaviourConfig) -> list[dict[str, Any]]:
    """``records`` sorted as an uninterrupted run writes them (unit, then pool question)."""
    order = {_unit_key(*u): i for i, u in enumerate(config.units())}
    return sorted(records, key=lambda r: (order[r["unit"]], r["pool_index"]))


def complete_units(
    records: Sequence[dict[str, Any]], n_pool: int
) -> tuple[list[dict[str, Any]], set[str]]:
    """The records of the units a resume log holds in full (one record per pool question,
    each once) and the set of those units; a unit cut short by a crash is left out."""
    by_unit: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_unit.setdefault(r.get("unit", ""), []).append(r)
    done = {
        unit
        for unit, rows in by_unit.items()
        if sorted(r.get("pool_index", -1) for r in rows) == list(range(n_pool))
    }
    return [r for r in records if r.get("unit") in done], done


def _resume(
    partial: Path, progress_cfg: Path, run_fingerprint: str, n_pool: int
) -> tuple[list[dict[str, Any]], set[str]]:
    """Finished units from an earlier, interrupted run of the same config; the log is
    rewritten to hold only those, so appending the next unit cannot follow a torn one."""
    marker = None
    if progress_cfg.is_file():
        try:
            marker = cache.read_json(progress_cfg).get("fingerprint")
        except (CacheError, AttributeError):
            marker = None
    if marker != run_fingerprint:
        partial.unlink(missing_ok=True)
        cache.write_json(progress_cfg, {"fingerprint": run_fingerprint})
        return [], set()
    if not partial.exists():
        return [], set()
    logged = cache.read_jsonl(partial, allow_torn_tail=True)
    records, done = complete_units(logged, n_pool)
    if len(records) != len(logged) or partial.read_bytes()[-1:] not in (b"", b"\n"):
        logger.info(
            "grouped prompts: dropping %d records of unfinished units", len(logged) - len(records)
        )
        cache.write_jsonl(partial, records)
    logger.info("grouped prompts: resuming, %d units already done", len(done))
    return records, done


def behaviours_dir(model_name: str, root: Path | None = None) -> Path:
    """The stage's cache folder; a ``grouped_prompts/`` folder of an older cache is moved
    there first (:func:`spare_tl.stages.migrations.rename_stage_folder`)."""
    from spare_tl.stages.migrations import rename_stage_folder

    directory = cache.stage_dir(model_name, STAGE, root)
    return rename_stage_folder(directory.parent, LEGACY_STAGE, STAGE)


def group_prompts(
    model,
    pool: Sequence[ConflictItem],
    config: BehaviourConfig | None = None,
    *,
    cache_root: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> GroupedPrompts:
    """Run the pool's conflict prompts and label each by behaviour (cached, resumable)."""
    config = config or BehaviourConfig()
    full_config = behaviours_config(model, pool, config)
    directory = behaviours_dir(model.cfg.model_name, cache_root)
    if use_cache and cache.is_fresh(directory, full_config):
        logger.info("grouped prompts: cached in %s", directory)
        return GroupedPrompts.load(directory)

    records: list[dict[str, Any]] = []
    done: set[str] = set()
    partial = directory / "partial.jsonl"
    progress_cfg = directory / "partial_config.json"
    if use_cache:
        cache.begin_stage(directory)
        records, done = _resume(partial, progress_cfg, cache.fingerprint(full_config), len(pool))

    units = [u for u in config.units() if _unit_key(*u) not in done]
    for unit in tqdm(units, desc="grouping prompts", disable=not progress):
        unit_records = answer_unit_rows(model, pool, unit, range(len(pool)), config)
        records.extend(unit_records)
        if use_cache:
            cache.append_jsonl(partial, unit_records)

    records = in_unit_order(records, config)  # as uninterrupted
    result = GroupedPrompts(model_name=model.cfg.model_name, records=records, config=full_config)
    if use_cache:
        result.save(directory)
        partial.unlink(missing_ok=True)
        progress_cfg.unlink(missing_ok=True)
    return result


def require_groups(grouped: GroupedPrompts, min_per_group: int = 2) -> None:
    """Fail early when a behaviour group is too small for mutual information."""
    counts = grouped.counts()
    small = [g for g in ("context", "memory") if counts[g] < min_per_group]
    if small:
        raise ValueError(
            f"behaviour group(s) {small} have fewer than {min_per_group} prompts "
            f"(counts: {counts}); add demonstration types that elicit them (dso for memory, "
            "dss for context), more seeds or shots, or a larger pool"
        )
