"""Issue 19's table, one test per row: each fault gives a clear one-line error or the
correct result. (The fault-injection suite, ``test_fault_injection.py``, covers every write,
file and SAE; these pin the reported cases.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from spare_tl import cache
from spare_tl.cli import error_line, main
from spare_tl.errors import CacheError, SAEMismatchError
from spare_tl.stages import behaviours as behaviours_mod
from spare_tl.stages import memorised as memorised_mod
from spare_tl.stages.memorised import dataset_key, find_memorised

pytestmark = pytest.mark.usefixtures("one_thread")
EMBEDDED = cache.REPO_ROOT / "cache_data" / "smollm2-135m-instruct"


def _items(n: int, tag: str = "") -> list:
    from spare_tl.data.schema import ConflictItem

    return [
        ConflictItem(
            f"q{i}{tag}?", f"It is m{i}.", (f"m{i}",), f"It is c{i}.", (f"c{i}",), f"r{i % 2}"
        )
        for i in range(n)
    ]


def _knows_even(model, prompts, **kwargs):
    return [
        "m" + p.rsplit("question: q", 1)[1].split("?")[0].rstrip("x")
        if int(p.rsplit("question: q", 1)[1].split("?")[0].rstrip("x")) % 2 == 0
        else "?"
        for p in prompts
    ]


def _one_line(e: BaseException, *names: str) -> str:
    line = error_line(e)
    assert line is not None and "\n" not in line, line
    for name in names:
        assert name in line, line
    return line


# row 1 ---------------------------------------------------------------------------------


def test_row1_a_user_file_named_builtin_never_touches_the_builtin_folder(
    tiny_model, tmp_path, monkeypatch
):
    """Two datasets called "builtin" with different items get different folders; the
    first one's files are byte-identical after the second is cached."""
    monkeypatch.setattr(memorised_mod, "greedy_generate", _knows_even)
    first = find_memorised(tiny_model, _items(8), dataset_name="builtin", cache_root=tmp_path)
    folder = tmp_path / "tiny-llama" / "memorised" / dataset_key("builtin", _items(8))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    user = _items(6, tag="x")
    second = find_memorised(
        tiny_model, user, dataset_name="/some/dir/builtin.jsonl", cache_root=tmp_path
    )
    assert dataset_key("/some/dir/builtin.jsonl", user) != folder.name
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert len(first.predictions) == 8 and len(second.predictions) == 6


def test_row1_the_builtin_key_resolves_to_the_committed_folder():
    from spare_tl.data.datasets import load_dataset

    folder = EMBEDDED / "memorised" / dataset_key("builtin", load_dataset("builtin"))
    summary = cache.read_json(folder / "summary.json")
    assert (summary["n_memorised"], summary["n_items"]) == (949, 2585)
    assert cache.verify_stage(folder)["config"]["items_hash"] in folder.name


# row 2 ---------------------------------------------------------------------------------


def test_row2_a_cut_predictions_file_is_refused_and_nothing_downstream_is_deleted(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setattr(memorised_mod, "greedy_generate", _knows_even)
    items = _items(8)
    find_memorised(tiny_model, items, n_shots=1, cache_root=tmp_path)
    folder = tmp_path / "tiny-llama" / "memorised" / dataset_key("builtin", items)
    downstream = tmp_path / "tiny-llama" / "behaviours"
    downstream.mkdir()
    (downstream / "records.jsonl").write_text("{}\n")
    preds = folder / "predictions.jsonl"
    preds.write_bytes(preds.read_bytes()[:200])  # cut mid-line, stage marked complete
    with pytest.raises(CacheError) as e:
        find_memorised(tiny_model, items, n_shots=1, cache_root=tmp_path)
    _one_line(e.value, "predictions.jsonl", "truncated")
    assert (downstream / "records.jsonl").exists()


def test_row2_read_jsonl_never_drops_a_cut_off_last_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    with pytest.raises(CacheError, match="cut off"):
        cache.read_jsonl(path)
    assert cache.read_jsonl(path, allow_torn_tail=True) == [{"a": 1}, {"a": 2}]


# row 3 ---------------------------------------------------------------------------------


def test_row3_a_half_appended_unit_is_redone_not_counted(tiny_model, tmp_path, monkeypatch):
    from spare_tl.stages.behaviours import BehaviourConfig, group_prompts

    pool = _items(6)
    config = BehaviourConfig(shots=(1,), seeds=(0, 1, 2), demo_types=("dss",), max_new_tokens=2)
    fresh = group_prompts(tiny_model, pool, config, use_cache=False, progress=False)
    real_append = cache.append_jsonl
    calls = {"n": 0}

    def crash_midway(path, records):
        calls["n"] += 1
        records = list(records)
        if calls["n"] == 2:  # the second unit: half its rows, then the process dies
            real_append(path, records[:3])
            raise KeyboardInterrupt
        real_append(path, records)

    monkeypatch.setattr(cache, "append_jsonl", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        group_prompts(tiny_model, pool, config, cache_root=tmp_path, progress=False)
    monkeypatch.setattr(cache, "append_jsonl", real_append)
    resumed = group_prompts(tiny_model, pool, config, cache_root=tmp_path, progress=False)
    assert len(resumed.records) == 3 * len(pool)
    assert resumed.records == fresh.records


# row 4 ---------------------------------------------------------------------------------


def test_row4_seed1_statistics_are_never_served_as_seed0(tiny_model, tmp_path, monkeypatch):
    from spare_tl.stages.activations import Activations
    from spare_tl.stages.statistics import feature_statistics
    from spare_tl.testing import tiny_sae

    torch.manual_seed(0)
    acts = Activations(
        "tiny-llama",
        {1: torch.randn(24, 32)},
        torch.tensor([0, 1] * 12),
        torch.ones(24),
        {"grouped_hash": "x"},
    )
    saes = {1: tiny_sae("blocks.1.hook_resid_post", k=16)}
    seed0 = feature_statistics(tiny_model, acts, saes, seed=0, cache_root=tmp_path, progress=False)
    real = cache.mark_complete

    def crash(*args, **kwargs):  # data of seed 1 written, config.json not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "mark_complete", crash)
    with pytest.raises(KeyboardInterrupt):
        feature_statistics(tiny_model, acts, saes, seed=1, cache_root=tmp_path, progress=False)
    monkeypatch.setattr(cache, "mark_complete", real)
    again = feature_statistics(tiny_model, acts, saes, seed=0, cache_root=tmp_path, progress=False)
    assert torch.equal(again[1].mutual_information, seed0[1].mutual_information)


# row 5 ---------------------------------------------------------------------------------


def test_row5_flipped_bytes_in_committed_statistics_are_refused(tmp_path):
    from spare_tl.stages.statistics import LayerStatistics

    layer_dir = tmp_path / "layer14"
    shutil.copytree(EMBEDDED / "mutual_information" / "layer14", layer_dir)
    path = layer_dir / "layer14.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError) as e:
        LayerStatistics.load(path)
    _one_line(e.value, "layer14.safetensors", "SHA-256")


# row 6 ---------------------------------------------------------------------------------


def test_row6_permuted_sae_latents_are_refused_naming_the_layer():
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES
    from spare_tl.features import FunctionalFeatures, sae_fingerprint
    from spare_tl.methods.spare import _check_same_sae
    from spare_tl.saes import load_sae

    features = FunctionalFeatures.load(DEFAULT_FEATURES)
    layer = max(features.layers)  # a layer of the committed set
    sae = load_sae(DEFAULT_SAES / f"blocks.{layer}.hook_resid_post")
    assert sae_fingerprint(sae) == features.layers[layer].sae_fingerprint  # committed pair
    _check_same_sae(layer, sae, features.layers[layer])
    perm = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    with pytest.raises(SAEMismatchError) as e:
        _check_same_sae(layer, sae, features.layers[layer])
    _one_line(e.value, f"layer {layer}", "pass the SAEs the features were made with")


def test_row6_every_committed_feature_layer_records_its_committed_sae():
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES
    from spare_tl.features import FunctionalFeatures, sae_fingerprint
    from spare_tl.saes import load_sae

    features = FunctionalFeatures.load(DEFAULT_FEATURES)
    for direction in ("context", "memory"):
        for layer, f in features.for_direction(direction).layers.items():
            sae = load_sae(DEFAULT_SAES / f"blocks.{layer}.hook_resid_post")
            assert f.sae_fingerprint == sae_fingerprint(sae), (direction, layer)


# row 7 ---------------------------------------------------------------------------------


def test_row7_nan_edit_strength_never_reaches_features_json(tmp_path):
    from spare_tl.features import FunctionalFeatures
    from spare_tl.stages.pipeline import PipelineConfig

    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite"):
            PipelineConfig(to_context={"edit_strength": bad})
        with pytest.raises(ValueError, match="finite"):
            FunctionalFeatures("m", {}, 0.1, edit_strength=bad)
    assert (
        main(
            [
                "import-original",
                str(tmp_path),
                "--layers",
                "1",
                "--proportion",
                "0.1",
                "--edit-strength",
                "nan",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "out").exists()


# rows 8-10: CLI inputs, before the model is loaded ---------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    from spare_tl import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


def _fails_in_one_line(argv, capsys, *names):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


def test_row8_evaluate_output_directory_is_refused_before_work(tmp_path, capsys, no_model):
    _fails_in_one_line(["evaluate", "--output", str(tmp_path)], capsys, str(tmp_path))


def test_row9_raw_tracebacks_are_one_line_errors(tmp_path, capsys, no_model):
    from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES

    feats = tmp_path / "features"
    shutil.copytree(DEFAULT_FEATURES, feats)
    meta = json.loads((feats / "features.json").read_text())
    loop = tmp_path / "loop"
    shutil.copytree(DEFAULT_FEATURES, loop)
    (loop / "features.json").write_text(json.dumps({**meta, "to_memory": "."}))
    cut = tmp_path / "cut"
    shutil.copytree(DEFAULT_FEATURES, cut)
    tensors = cut / "features.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    saes = tmp_path / "saes"
    shutil.copytree(DEFAULT_SAES, saes)
    cfg_path = saes / "blocks.12.hook_resid_post" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "d_in": 500}))
    (tmp_path / "x.jsonl").mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    steer = ["steer", "--context", "c", "--question", "q?"]
    _fails_in_one_line([*steer, "--features", str(cut)], capsys, "features.safetensors")
    _fails_in_one_line([*steer, "--features", str(loop)], capsys, "to_memory")
    _fails_in_one_line([*steer, "--saes", str(saes)], capsys, "cfg.json", "d_in 500")
    out = ["--output", str(tmp_path / "r.json")]
    _fails_in_one_line(
        ["evaluate", *out, "--dataset", str(tmp_path / "x.jsonl")], capsys, "x.jsonl"
    )
    _fails_in_one_line(
        [
            "import-original",
            str(tmp_path),
            "--layers",
            "1",
            "--proportion",
            "0.1",
            "--output",
            str(a_file),
        ],
        capsys,
        "a_file",
    )


def test_row9_truncated_safetensors_from_a_library_call_is_one_line(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "t.safetensors"
    cache.write_tensors(path, {"x": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(Exception) as e:
        load_file(str(path))
    _one_line(e.value, "cache verify")
    with pytest.raises(CacheError) as e2:
        cache.read_tensors(path)
    _one_line(e2.value, "t.safetensors")


def test_row10_counts_and_empty_strings_are_refused(capsys, no_model):
    steer = ["steer", "--context", "c", "--question", "q?"]
    _fails_in_one_line([*steer, "--demonstrations", "-3"], capsys, "--demonstrations")
    _fails_in_one_line(["steer", "--context", "", "--question", ""], capsys, "--context")
    _fails_in_one_line(
        ["evaluate", "--output", "/tmp/r.json", "--pool-size", "0"], capsys, "--pool-size"
    )


# row 11 --------------------------------------------------------------------------------


def test_row11_nothing_memorised_says_so(tiny_model, tmp_path, monkeypatch):
    from spare_tl.data.schema import write_conflict_jsonl
    from spare_tl.stages.pipeline import PipelineConfig, run_pipeline

    monkeypatch.setattr(memorised_mod, "greedy_generate", lambda m, p, **k: ["?"] * len(p))
    monkeypatch.setattr(behaviours_mod, "generate_and_score", None)
    data = tmp_path / "d.jsonl"
    write_conflict_jsonl(_items(6), data)
    config = PipelineConfig(
        model="tiny-llama", dataset=str(data), pool_size=2, cache_root=str(tmp_path)
    )
    with pytest.raises(ValueError, match="0 of 6 questions") as e:
        run_pipeline(config, until="behaviours", model=tiny_model, progress=False)
    _one_line(e.value, "are memorised")


# the rest of the protocol ---------------------------------------------------------------


def test_cache_files_are_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        cache.write_json(tmp_path / "a.json", {})
        cache.write_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "t.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~0o022


def test_committed_cache_verifies_and_read_only_commands_do_not_rewrite_it(capsys):
    before = {p: p.stat().st_mtime_ns for p in EMBEDDED.rglob("*") if p.is_file()}
    assert main(["cache", "verify", str(EMBEDDED.parent)]) == 0
    out = capsys.readouterr().out
    assert "BAD" not in out and "unsealed" not in out
    assert {p: p.stat().st_mtime_ns for p in EMBEDDED.rglob("*") if p.is_file()} == before


def test_an_unsealed_stage_is_refused_until_sealed(tmp_path):
    stage = tmp_path / "stage"
    cache.write_jsonl(stage / "r.jsonl", [{"a": 1}])
    cache.write_json(
        stage / "config.json", {"config": {"x": 1}, "fingerprint": cache.fingerprint({"x": 1})}
    )
    (stage / "config.json").write_text(
        json.dumps({"config": {"x": 1}, "fingerprint": cache.fingerprint({"x": 1}), "complete": 1})
    )
    with pytest.raises(CacheError, match="cache seal"):
        cache.is_fresh(stage, {"x": 1})
    assert main(["cache", "seal", str(stage)]) == 0
    assert cache.is_fresh(stage, {"x": 1})
    assert Path(stage / "r.jsonl").read_text() == '{"a": 1}\n'
