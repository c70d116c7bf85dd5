"""Data parallelism: ranks, shards, the shard protocol, and a 2-rank torchrun run that writes
the same stage as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spare_tl import cache
from spare_tl.distributed import Merged, Ranks, TensorUnit, run_sharded, shard, shard_dir, unit_file
from spare_tl.errors import CacheError

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMING = ("seconds_per_item", "shared_prefix_seconds_per_item", "time_relative_to_no_steering")


def test_ranks_from_the_torchrun_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    r = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (r.rank, r.world_size, r.local_rank, r.distributed, r.is_main) == (3, 8, 1, True, False)
    with pytest.raises(ValueError, match="torchrun environment"):
        Ranks.from_env({"RANK": "x"})
    with pytest.raises(ValueError, match="not in a world of size 2"):
        Ranks(2, 2)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_unit_once_in_a_fixed_order(world):
    units = [f"u{i}" for i in range(7)]
    shards = [shard(units, Ranks(r, world)) for r in range(world)]
    assert sorted(u for s in shards for u in s) == sorted(units)
    assert shards == [shard(units, Ranks(r, world)) for r in range(world)]
    if world == 2:
        assert shards == [["u0", "u2", "u4", "u6"], ["u1", "u3", "u5"]]


def _merge(results):
    return {"merged.json": lambda p: cache.write_json(p, results)}


def _run(directory, rank, world, calls, fail_on=None):
    def compute(key):
        if key == fail_on:
            raise RuntimeError(f"killed while computing {key}")
        calls.append((rank, key))
        return {"key": key, "value": len(key) * 10}

    return run_sharded(
        directory,
        {"job": "toy"},
        ["a", "bb", "c", "dd", "e"],
        compute,
        _merge,
        r=Ranks(rank, world),
    )


def test_two_ranks_seal_a_stage_and_resume_an_interrupted_shard(tmp_path):
    """Ranks run one after another in one process (no process group: barriers are no-ops),
    which is what each does under torchrun."""
    stage, calls = tmp_path / "stage", []
    assert _run(stage, 1, 2, calls) is False  # rank 1: its shard, then not the main rank
    assert calls == [(1, "bb"), (1, "dd")]
    assert cache.read_stage_config(stage) is None  # not sealed before rank 0 merges
    with pytest.raises(RuntimeError, match="killed while computing e"):
        _run(stage, 0, 2, calls, fail_on="e")  # rank 0 dies after two of its units
    assert calls[2:] == [(0, "a"), (0, "c")]
    assert _run(stage, 0, 2, calls) is True  # restarted: only the missing unit
    assert calls[4:] == [(0, "e")]
    cache.verify_stage(stage)
    merged = cache.read_json(stage / "merged.json")
    assert [m["key"] for m in merged] == ["a", "bb", "c", "dd", "e"]
    assert sorted(p.name for p in stage.iterdir()) == ["config.json", "merged.json"]
    assert _run(stage, 0, 2, calls) is True and len(calls) == 5  # sealed: reused


def test_a_damaged_shard_is_refused(tmp_path):
    stage, calls = tmp_path / "stage", []
    _run(stage, 1, 2, calls)
    unit = shard_dir(stage, {"job": "toy"}, Ranks(1, 2)) / unit_file("bb")
    unit.write_text(unit.read_text().replace("20", "21"))
    with pytest.raises(CacheError, match="does not match the SHA-256"):
        _run(stage, 0, 2, calls)
    assert cache.read_stage_config(stage) is None


def test_tensor_units_resume_and_merge_with_manifest_fields(tmp_path):
    """A unit with tensors is a safetensors file beside its JSON; a restarted rank keeps the
    units it finished; ``Merged`` adds fields to the stage's config.json."""
    stage, calls = tmp_path / "stage", []

    def compute(key):
        if key == "c" and len(calls) == 1:
            raise RuntimeError("killed")
        calls.append(key)
        return TensorUnit({"x": torch.full((2,), float(ord(key)))}, {"key": key})

    def merge(results):
        x = torch.cat([u.tensors["x"] for u in results])
        files = {"x.safetensors": lambda p: cache.write_tensors(p, {"x": x})}
        return Merged(files, {"keys": [u.data["key"] for u in results]})

    def run(rank):
        return run_sharded(stage, {"job": "t"}, ["a", "b", "c"], compute, merge, r=Ranks(rank, 2))

    with pytest.raises(RuntimeError, match="killed"):
        run(0)  # rank 0 finishes "a", dies in "c"
    mine = shard_dir(stage, {"job": "t"}, Ranks(0, 2))
    assert sorted(p.name for p in mine.iterdir()) == ["unit-a.json", "unit-a.safetensors"]
    assert run(1) is False and run(0) is True
    assert calls == ["a", "b", "c"]  # "a" was kept, not recomputed
    meta = cache.verify_stage(stage)
    assert meta["keys"] == ["a", "b", "c"] and list(meta["files"]) == ["x.safetensors"]
    x = cache.read_tensors(stage / "x.safetensors")["x"]
    assert x.tolist() == [97.0, 97.0, 98.0, 98.0, 99.0, 99.0]


def test_a_split_stage_resumes_from_a_ranks_finished_units(tmp_path, tiny_model, monkeypatch):
    """The activations stage, rank 0 of 2 killed after its first unit: the restart runs only
    the rest, and the sealed folder is the one-process stage's."""
    import distributed_worker as worker

    from spare_tl import distributed
    from spare_tl.stages import activations, sharded_pipeline
    from spare_tl.stages.behaviours import BehaviourConfig, group_prompts

    config = BehaviourConfig(shots=(2,), seeds=(0,), demo_types=("doo",), max_new_tokens=2)
    pool = worker.tiny_setup(1)[4]
    grouped = worker.relabelled(
        group_prompts(tiny_model, pool, config, use_cache=False, progress=False)
    )
    one = activations.collect_activations(
        tiny_model, grouped, [1], batch_size=2, cache_root=tmp_path / "one", progress=False
    )
    run, runs = activations.ActivationPass.run, []

    def counted(self, model, batches, progress=False):
        if len(runs) == 1 and distributed.ranks().rank == 0:
            raise RuntimeError("killed")
        runs.append([list(b) for b in batches])
        return run(self, model, batches, progress)

    monkeypatch.setattr(activations.ActivationPass, "run", counted)

    def split(rank):
        monkeypatch.setattr(distributed, "ranks", lambda: Ranks(rank, 2))
        return sharded_pipeline.collect_activations_sharded(
            tiny_model, grouped, [1], batch_size=2, cache_root=tmp_path / "two",
            batches_per_unit=2,
        )  # fmt: skip

    with pytest.raises(RuntimeError, match="killed"):
        split(0)
    with pytest.raises(CacheError, match="not a completed stage"):
        split(1)  # its shard is written; without a process group nothing waits for the seal
    two = split(0)
    assert len(runs) == 3  # 12 prompts, 3 units: rank 0's first kept, its second redone
    assert sorted(i for r in runs for b in r for i in b) == list(range(len(pool)))
    assert torch.equal(two.resid[1], one.resid[1])
    folders = [root / "tiny-llama" / "activations" for root in (tmp_path / "one", tmp_path / "two")]
    for name in ("activations.safetensors", "config.json"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_unit_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match="bad work-unit key"):
        unit_file("../x")
    with pytest.raises(ValueError, match="unique"):
        run_sharded(tmp_path, {}, ["a", "a"], lambda k: k, _merge, r=Ranks(0, 1))


def _torchrun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    done = subprocess.run(
        [*command, "2", str(WORKER), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _same_stage(one: Path, two: Path) -> None:
    for name in ("summary.json", "predictions.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifests = [cache.verify_stage(d)["files"] for d in (one, two)]
    for name in ("summary.json", "predictions.jsonl"):
        assert manifests[0][name] == manifests[1][name]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def _without_timing(summary: dict) -> dict:
    summary = json.loads(json.dumps(summary))
    for key in TIMING:
        summary["method"].pop(key)
    for key in ("seconds", "machine"):  # the run's, not the answers'
        summary.pop(key, None)
    return summary


def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path):
    import distributed_worker

    from spare_tl.stages.evaluation import EvaluationConfig, evaluate
    from spare_tl.stages.sharded import evaluate_sharded

    _torchrun(["--out", str(tmp_path / "two")], timeout=240)
    model, features, saes, items, pool = distributed_worker.tiny_setup(6)
    config = EvaluationConfig(seeds=(0, 1, 2), max_new_tokens=6)
    common = dict(features=features, saes=saes, config=config, progress=False)
    one = evaluate_sharded(model, items, pool, tmp_path / "one", **common)
    _same_stage(tmp_path / "one", tmp_path / "two")
    direct = evaluate(model, items, pool, **common)
    assert one.predictions == json.loads(json.dumps(direct.predictions))
    assert _without_timing(one.to_json()) == _without_timing(direct.to_json())
    answers = {r["steer_to_memory.prediction"] for r in one.predictions}
    assert len(answers) > 1 and one.predictions[0]["no_steering.prediction"]

    # the memorised set: every file of the stage, config.json included, byte for byte
    from spare_tl.stages.memorised import closed_book_units, find_memorised

    mem_items = distributed_worker.MEMORISED_ITEMS()
    mem = distributed_worker.MEM
    units = closed_book_units(mem_items, mem["n_shots"], 0, mem["min_shared"])[1]
    assert len(units) >= 3  # work for both ranks
    single = find_memorised(model, mem_items, cache_root=tmp_path / "mem", progress=False, **mem)
    folders = [
        next((root / "tiny-llama" / "memorised").iterdir())
        for root in (tmp_path / "mem", tmp_path / "two-mem")
    ]
    assert folders[0].name == folders[1].name
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == ["config.json", "predictions.jsonl", "summary.json"]
    assert names == sorted(p.name for p in folders[1].iterdir())
    for name in names:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    assert len({p["prediction"] for p in single.predictions}) > 1

    # the steerability scan: the same scan.json as one process (apart from the run's time)
    from spare_tl.stages.scan import ScanResult, steerability_scan
    from spare_tl.stages.sharded import scan_sharded

    scan_one = scan_sharded(
        model, items, pool, distributed_worker.SCAN, root=tmp_path / "scan", progress=False
    )
    scan_two = ScanResult.load(tmp_path / "two-scan" / "tiny-llama" / "scan")
    run = {"seconds": None, "machine": None}  # the run's, not the answers'
    assert {**scan_two.to_json(), **run} == {**scan_one.to_json(), **run}
    direct = steerability_scan(model, items, pool, distributed_worker.SCAN, progress=False)
    assert direct.rows == scan_one.rows and direct.baseline == scan_one.baseline
    assert direct.donors == scan_one.donors
    assert direct.answers == scan_one.answers and len(direct.answers) == 1 + 2 * 3 * 2
    assert len({tuple(a) for a in direct.answers.values()}) > 1  # patches moved answers

    # grouping, activations and the sweep: the stage folders byte for byte, the sweep's records
    _split_stages_equal_one_process(model, saes, items, pool, tmp_path)


def _same_folder(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and "config.json" in names
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), f"{one.name}/{name}"


def _split_stages_equal_one_process(model, saes, items, pool, tmp_path: Path) -> None:
    import distributed_worker as worker

    from spare_tl.stages.activations import collect_activations
    from spare_tl.stages.behaviours import group_prompts
    from spare_tl.stages.statistics import feature_statistics
    from spare_tl.stages.sweep import sweep

    root, two = tmp_path / "one-pipe", tmp_path / "two-pipe"
    grouped = group_prompts(model, pool, worker.BEHAVIOURS, cache_root=root, progress=False)
    _same_folder(root / "tiny-llama" / "behaviours", two / "tiny-llama" / "behaviours")
    assert len(grouped.records) == 2 * 2 * len(pool)
    assert len({r["prediction"] for r in grouped.records}) > 1
    acts = collect_activations(
        model, worker.relabelled(grouped), [1, 2], batch_size=4, cache_root=root, progress=False
    )
    _same_folder(root / "tiny-llama" / "activations", two / "tiny-llama" / "activations")
    stats = feature_statistics(model, acts, saes, use_cache=False, progress=False)
    dev = worker.own_answers(model, items, pool)
    records = sweep(model, stats, saes, dev, pool, worker.sweep_grid(), n_shots=2,
                    batch_size=4, progress=False)  # fmt: skip
    assert cache.read_json(two / "sweep_records" / "records.json") == json.loads(
        json.dumps(records)
    )
    assert len(records) == 1 + 8 and len({r["EM_M"] for r in records}) > 1


@pytest.mark.integration
def test_embedded_evaluation_under_two_ranks_equals_one_process(tmp_path):
    _torchrun(["--embedded", "--items", "6", "--out", str(tmp_path / "two")], timeout=900)
    one = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "--embedded",
            "--items",
            "6",
            "--out",
            str(tmp_path / "one"),
            "--direct",
            str(tmp_path / "direct.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    _same_stage(tmp_path / "one", tmp_path / "two")
    direct = json.loads((tmp_path / "direct.json").read_text())
    saved = cache.read_json(tmp_path / "two" / "summary.json")
    assert _without_timing(direct) == saved
