"""Fault injection on the tiny model: crashes at every write, corrupted files, wrong SAEs
and bad inputs. After each fault the next run either resumes to the result of an
uninterrupted run (byte-identical cache) or stops with one line naming the file and the fix.

Scenarios are counted per kind in :data:`COUNTS` and written to
``$SPARE_TL_FAULT_COUNTS`` (JSON) when that variable is set, so the README can quote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from spare_tl import cache
from spare_tl.cli import error_line
from spare_tl.data.schema import ConflictItem, write_conflict_jsonl
from spare_tl.errors import CacheError, SAEError, SAEMismatchError
from spare_tl.features import FunctionalFeatures
from spare_tl.saes import load_saes_for_layers
from spare_tl.stages import behaviours as behaviours_mod
from spare_tl.stages import memorised as memorised_mod
from spare_tl.stages.pipeline import PipelineConfig, run_pipeline
from spare_tl.testing import tiny_sae

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = {"crash points": 0, "corruptions": 0, "bad inputs": 0}
LAYERS = (1, 2)
IGNORED = {"partial.jsonl", "partial_config.json"}  # resume logs left by a crash after save


class Crash(BaseException):
    """An injected crash (BaseException: nothing in the library may swallow it)."""


def _items(n: int = 16) -> list[ConflictItem]:
    return [
        ConflictItem(
            question=f"what is thing {i}?",
            org_context=f"Thing {i} is m{i}.",
            org_answer=(f"m{i}",),
            sub_context=f"Thing {i} is c{i}.",
            sub_answer=(f"c{i}",),
            relation=f"r{i % 2}",
        )
        for i in range(n)
    ]


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def fake_closed_book(model, prompts, **kwargs):
    """A model that knows the answer to every even-numbered thing."""
    out = []
    for p in prompts:
        i = int(p.rsplit("what is thing ", 1)[1].split("?")[0])
        out.append(f"m{i}" if i % 2 == 0 else "no idea")
    return out


def fake_generate_and_score(model, prompts, answers, **kwargs):
    """Deterministic answers (context, memory or neither by the prompt's hash) and NLLs."""
    out = []
    for p, (sub, org) in zip(prompts, answers):
        out.append([sub, org, "zzz"][_digest(p) % 3])
    nll = torch.tensor(
        [[1.0 + _digest(p) % 7 / 3, 1.0 + _digest(p + "m") % 5 / 2] for p in prompts],
        dtype=torch.float64,
    )
    return out, nll


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """Dataset file, SAE folder and a pipeline config on a fresh cache root per call."""
    base = tmp_path_factory.mktemp("fault")
    data = base / "things.jsonl"
    write_conflict_jsonl(_items(), data)
    saes = base / "saes"
    for layer in LAYERS:
        tiny_sae(f"blocks.{layer}.hook_resid_post", k=16, seed=layer).save_model(
            saes / f"blocks.{layer}.hook_resid_post"
        )
    return {"base": base, "data": data, "saes": saes, "model": tiny_model}


def _config(world, root: Path, **overrides) -> PipelineConfig:
    settings = dict(
        model="tiny-llama",
        dataset=str(world["data"]),
        saes=str(world["saes"]),
        layers=list(LAYERS),
        memorised_shots=1,
        pool_size=5,
        behaviours={"shots": [1], "seeds": [0, 1], "demo_types": ["dss", "dso"]},
        to_context={"proportion": 0.3, "edit_strength": 2.0},
        to_memory={"layers": [1], "proportion": 0.5, "edit_strength": 1.0},
        cache_root=str(root),
        features_dir=str(root / "features"),
        batch_size=4,
    )
    settings.update(overrides)
    return PipelineConfig(**settings)


#: another setting for every stage: its run replaces each stage of the reference run
VARIANT = {
    "memorised_shots": 2,
    "behaviours": {"shots": [1], "seeds": [0, 2], "demo_types": ["dss", "dso"]},
    "mi_seed": 1,
    "to_context": {"proportion": 0.5, "edit_strength": 2.0},
}


@pytest.fixture(autouse=True)
def fake_generation(monkeypatch):
    monkeypatch.setattr(memorised_mod, "greedy_generate", fake_closed_book)
    monkeypatch.setattr(behaviours_mod, "generate_and_score", fake_generate_and_score)


def run_all(world, root: Path, **overrides):
    return run_pipeline(
        _config(world, root, **overrides), until="features", model=world["model"], progress=False
    )


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file a run leaves (hidden temporaries and resume logs aside)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and p.name not in IGNORED and not any(s.startswith(".") for s in rel.parts):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted run: its cache snapshot and the list of its writes."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memorised_mod, "greedy_generate", fake_closed_book)
        mp.setattr(behaviours_mod, "generate_and_score", fake_generate_and_score)
        with counting_writes() as writes:
            result = run_all(world, root)
    assert result.features.counts()  # the run produced a feature set
    return {"root": root, "snapshot": snapshot(root), "writes": list(writes)}


# --------------------------------------------------------------------------------------
# Write interception: every atomic write and every append goes through these two seams
# --------------------------------------------------------------------------------------

_real_atomic = cache._atomic_path
_real_append = cache.append_jsonl


@contextmanager
def counting_writes():
    writes: list[str] = []

    @contextmanager
    def atomic(path):
        writes.append(f"write {Path(path).name}")
        with _real_atomic(path) as tmp:
            yield tmp

    def append(path, records):
        writes.append(f"append {Path(path).name}")
        _real_append(path, records)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "_atomic_path", atomic)
        mp.setattr(cache, "append_jsonl", append)
        yield writes


@contextmanager
def crash_at(index: int, phase: str, kill):
    """Crash at write ``index``: ``before`` it starts, ``during`` it (temporary written but
    not renamed; for an append, half the records and a torn line written) or ``after`` it."""
    state = {"n": -1}

    def hit(now: str) -> bool:
        return state["n"] == index and phase == now

    @contextmanager
    def atomic(path):
        state["n"] += 1
        if hit("before"):
            kill()
        with _real_atomic(path) as tmp:
            yield tmp
            if hit("during"):
                kill()
        if hit("after"):
            kill()

    def append(path, records):
        state["n"] += 1
        records = list(records)
        if hit("before"):
            kill()
        if hit("during"):
            half = records[: max(1, len(records) // 2)]
            _real_append(path, half)
            with Path(path).open("a") as f:
                f.write(json.dumps(records[len(half) % len(records)])[:40])  # a torn line
                f.flush()
            kill()
        _real_append(path, records)
        if hit("after"):
            kill()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "_atomic_path", atomic)
        mp.setattr(cache, "append_jsonl", append)
        yield


def _raise_crash():
    raise Crash()


def _sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


PHASES = ("before", "during", "after")


def test_reference_run_writes_every_stage(reference):
    kinds = {w.split()[1] for w in reference["writes"]}
    assert {"predictions.jsonl", "records.jsonl", "activations.safetensors"} <= kinds
    assert {"layer1.safetensors", "features.safetensors", "features.json"} <= kinds
    assert any(w == "append partial.jsonl" for w in reference["writes"])
    # every stage folder of the reference run is complete and verified
    ok, problems, unsealed = cache.verify_cache(reference["root"])
    assert not problems and not unsealed and len(ok) >= 6


def test_crash_at_every_write_resumes_to_the_identical_result(world, reference, tmp_path):
    """An exception at every write, before / during / after it, then a clean re-run."""
    n = len(reference["writes"])
    for index in range(n):
        for phase in PHASES:
            root = tmp_path / f"w{index}-{phase}"
            with crash_at(index, phase, _raise_crash), pytest.raises(Crash):
                run_all(world, root)
            run_all(world, root)
            assert snapshot(root) == reference["snapshot"], (index, phase)
            COUNTS["crash points"] += 1
            shutil.rmtree(root)


def test_crash_while_replacing_a_stage_never_serves_the_new_data_as_the_old(
    world, reference, tmp_path
):
    """Over a complete cache, a run with other settings crashes at each of its writes; the
    original settings then run again and get the original result (a stage's old
    config.json never vouches for the new, half-written data)."""
    with counting_writes() as writes:
        run_all(world, tmp_path / "variant", **VARIANT)
    for index in range(len(writes)):
        for phase in PHASES:
            root = tmp_path / f"v{index}-{phase}"
            shutil.copytree(reference["root"], root)
            with crash_at(index, phase, _raise_crash), pytest.raises(Crash):
                run_all(world, root, **VARIANT)
            run_all(world, root)
            assert snapshot(root) == reference["snapshot"], (index, phase)
            COUNTS["crash points"] += 1
            shutil.rmtree(root)


def test_sigkill_at_writes_resumes_to_the_identical_result(world, reference, tmp_path):
    """A forked run SIGKILLed inside writes (no cleanup runs, temporaries stay behind);
    the re-run finishes to the same cache. Points spread over every stage."""
    n = len(reference["writes"])
    points = [(i, PHASES[i % 3]) for i in range(0, n, max(1, n // 12))] + [(n - 1, "during")]
    for index, phase in points:
        root = tmp_path / f"k{index}-{phase}"
        pid = os.fork()
        if pid == 0:  # child: run until killed; never return into pytest
            try:
                with crash_at(index, phase, _sigkill):
                    run_all(world, root)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (index, phase)
        run_all(world, root)
        assert snapshot(root) == reference["snapshot"], (index, phase)
        COUNTS["crash points"] += 1
        shutil.rmtree(root)


def test_repeated_crashes_in_the_group_stage_still_resume_identically(world, reference, tmp_path):
    """Killed during the first unit, then during the second, then finished."""
    root = tmp_path / "again"
    appends = [i for i, w in enumerate(reference["writes"]) if w.startswith("append")]
    for index in appends[:2]:
        with crash_at(index, "during", _raise_crash), pytest.raises(Crash):
            run_all(world, root)
    run_all(world, root)
    assert snapshot(root) == reference["snapshot"]
    COUNTS["crash points"] += 1


# --------------------------------------------------------------------------------------
# Corruption: every file type truncated, cut by a byte, flipped, removed or extended
# --------------------------------------------------------------------------------------


def _truncate_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _cut_one(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _flip_middle(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def _flip_last_data_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    i = len(b) - 2 if b.endswith(b"\n") else len(b) - 1
    b[i] ^= 0x04
    p.write_bytes(bytes(b))


def _append_garbage(p: Path) -> None:
    with p.open("ab") as f:
        f.write(b'{"x": 1}\n')


def _delete(p: Path) -> None:
    p.unlink()


CORRUPTIONS = {
    "truncated to half": _truncate_half,
    "cut by one byte": _cut_one,
    "byte flipped in the middle": _flip_middle,
    "last byte flipped": _flip_last_data_byte,
    "extra line appended": _append_garbage,
    "deleted": _delete,
}


def _stage_files(root: Path) -> list[Path]:
    """Every data file a manifest lists (not config.json itself)."""
    out = []
    for source in cache._manifest_sources(root):
        for name in cache.read_json(source).get(cache.MANIFEST, {}):
            out.append(source.parent / name)
    return sorted(out)


def _assert_one_line(e: BaseException, names: str) -> None:
    line = error_line(e)
    assert line is not None, f"not an anticipated error: {e!r}"
    assert "\n" not in line and names in line, line


def test_every_corruption_of_every_file_is_refused_naming_it(world, reference, tmp_path):
    files = _stage_files(reference["root"])
    kinds = {p.suffix for p in files}
    assert kinds == {".jsonl", ".json", ".safetensors"}
    for target in files:
        rel = target.relative_to(reference["root"])
        for what, corrupt in CORRUPTIONS.items():
            root = tmp_path / "c"
            shutil.copytree(reference["root"], root)
            corrupt(root / rel)
            if rel.parts[0] == "features":  # loading refuses; the features stage rewrites
                with pytest.raises(CacheError) as e:
                    FunctionalFeatures.load(root / "features")
                _assert_one_line(e.value, rel.name)
                run_all(world, root)
                assert snapshot(root) == reference["snapshot"], (rel, what)
            else:
                with pytest.raises(CacheError) as e:
                    run_all(world, root)
                _assert_one_line(e.value, rel.name)
            COUNTS["corruptions"] += 1
            shutil.rmtree(root)


@pytest.mark.parametrize("what", ["truncated", "flipped", "deleted"])
def test_a_damaged_config_json_counts_as_incomplete_and_is_redone(world, reference, tmp_path, what):
    """config.json is the completion mark: unreadable or missing, the stage is redone, to
    the identical result."""
    for config in sorted(reference["root"].rglob(cache.CONFIG)):
        rel = config.relative_to(reference["root"])
        root = tmp_path / "d"
        shutil.copytree(reference["root"], root)
        p = root / rel
        if what == "truncated":
            _truncate_half(p)
        elif what == "flipped":
            b = bytearray(p.read_bytes())
            b[0] = ord("x")
            p.write_bytes(bytes(b))
        else:
            p.unlink()
        run_all(world, root)
        assert snapshot(root) == reference["snapshot"], (rel, what)
        COUNTS["corruptions"] += 1
        shutil.rmtree(root)


def test_cache_verify_finds_every_damaged_file(reference, tmp_path, capsys):
    from spare_tl.cli import main

    assert main(["cache", "verify", str(reference["root"])]) == 0
    for target in _stage_files(reference["root"]):
        rel = target.relative_to(reference["root"])
        root = tmp_path / "v"
        shutil.copytree(reference["root"], root)
        _flip_middle(root / rel)
        capsys.readouterr()
        assert main(["cache", "verify", str(root)]) == 2
        assert str(root / rel) in capsys.readouterr().out
        COUNTS["corruptions"] += 1
        shutil.rmtree(root)


# --------------------------------------------------------------------------------------
# Wrong SAEs
# --------------------------------------------------------------------------------------


def _steer_once(world, features, saes):
    from spare_tl.methods.spare import steer

    model = world["model"]
    tokens = model.to_tokens(["context: x\nquestion: y\nanswer:"])
    with steer(model, features, "context", saes):
        model(tokens)


def _permuted(sae, seed: int):
    perm = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    return sae


def test_steering_refuses_any_other_sae(world, reference):
    features = FunctionalFeatures.load(reference["root"] / "features")
    good = load_saes_for_layers(world["model"], world["saes"], list(LAYERS))
    _steer_once(world, features, good)  # the right SAEs steer
    wrong = {
        "permuted latents": lambda layer: _permuted(
            load_saes_for_layers(world["model"], world["saes"], [layer])[layer], layer
        ),
        "retrained (another seed)": lambda layer: tiny_sae(
            f"blocks.{layer}.hook_resid_post", k=16, seed=layer + 100
        ),
        "another k": lambda layer: tiny_sae(f"blocks.{layer}.hook_resid_post", k=8, seed=layer),
        "one weight nudged": lambda layer: _nudged(
            load_saes_for_layers(world["model"], world["saes"], [layer])[layer]
        ),
    }
    for what, make in wrong.items():
        for layer in features.layers:
            saes = dict(good)
            saes[layer] = make(layer)
            with pytest.raises(SAEMismatchError, match=f"layer {layer}:") as e:
                _steer_once(world, features, saes)
                pytest.fail(f"{what} SAE at layer {layer} was accepted")
            _assert_one_line(e.value, "fingerprint")
            COUNTS["corruptions"] += 1


def _nudged(sae):
    with torch.no_grad():
        sae.W_dec[3, 5] += 1e-4
    return sae


def test_swapped_or_damaged_sae_folders_are_refused(world, reference, tmp_path):
    saes = tmp_path / "saes"
    cases = []
    # the two layers' folders swapped: each SAE sits at the other's hook
    shutil.copytree(world["saes"], saes)
    a, b = (saes / f"blocks.{layer}.hook_resid_post" for layer in LAYERS)
    a.rename(saes / "tmp")
    b.rename(a)
    (saes / "tmp").rename(b)
    cases.append(("swapped", saes))
    for what in ("truncated", "flipped", "d_in"):
        folder = tmp_path / f"saes-{what}"
        shutil.copytree(world["saes"], folder)
        layer_dir = folder / "blocks.1.hook_resid_post"
        if what == "truncated":
            _truncate_half(layer_dir / "sae_weights.safetensors")
        elif what == "flipped":
            _flip_middle(layer_dir / "sae_weights.safetensors")
        else:
            cfg = json.loads((layer_dir / "cfg.json").read_text())
            cfg["d_in"] = 16
            (layer_dir / "cfg.json").write_text(json.dumps(cfg))
        cases.append((what, folder))
    features = FunctionalFeatures.load(reference["root"] / "features")
    for what, folder in cases:
        with pytest.raises((SAEError, SAEMismatchError, CacheError, RuntimeError, Exception)) as e:
            saes_now = load_saes_for_layers(world["model"], folder, list(LAYERS))
            _steer_once(world, features, saes_now)
        assert error_line(e.value) is not None, (what, e.value)
        assert "\n" not in error_line(e.value)
        COUNTS["corruptions"] += 1


# --------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2, and the model is never loaded
# --------------------------------------------------------------------------------------


def _bad_inputs(world, reference, tmp: Path) -> list[tuple[list[str], str]]:
    feats = reference["root"] / "features"
    saes = str(world["saes"])
    good = ["--features", str(feats), "--saes", saes]
    a_dir = tmp / "a_dir"
    a_dir.mkdir()
    a_file = tmp / "a_file.json"
    a_file.write_text("{}")
    (tmp / "x.jsonl").mkdir()

    def features_with(name: str, change) -> str:
        folder = tmp / f"features-{name}"
        shutil.copytree(feats, folder)
        meta_path = folder / "features.json"
        text = meta_path.read_text()
        meta_path.write_text(change(text))
        return str(folder)

    def saes_with(name: str, change) -> str:
        folder = tmp / f"saes-{name}"
        shutil.copytree(world["saes"], folder)
        change(folder / "blocks.1.hook_resid_post")
        return str(folder)

    def wrong_d_in(d: Path) -> None:
        cfg = json.loads((d / "cfg.json").read_text())
        (d / "cfg.json").write_text(json.dumps({**cfg, "d_in": 16}))

    loop = features_with(
        "loop", lambda t: t.replace('"to_memory": "to_memory"', '"to_memory": "."')
    )
    nan = features_with("nan", lambda t: t.replace('"edit_strength": 2.0', '"edit_strength": NaN'))
    cut = features_with("cut", lambda t: t[: len(t) // 2])
    bad_d_in = saes_with("d_in", wrong_d_in)
    cut_sae = saes_with("cut", lambda d: _truncate_half(d / "sae_weights.safetensors"))
    ask = ["steer", "--context", "It is c1.", "--question", "what is it?"]
    cases: list[tuple[list[str], str]] = [
        ([*ask, *good, "--demonstrations", "-3"], "--demonstrations"),
        ([*ask, *good, "--demonstrations", "0"], "--demonstrations"),
        ([*ask, *good, "--edit-strength", "nan"], "finite"),
        ([*ask, *good, "--edit-strength", "inf"], "finite"),
        ([*ask, *good, "--edit-strength", "-1"], "finite"),
        (["steer", "--context", "", "--question", "q?", *good], "--context is empty"),
        (["steer", "--context", "  ", "--question", "q?", *good], "--context is empty"),
        (["steer", "--context", "c", "--question", "", *good], "--question is empty"),
        ([*ask, "--features", str(a_dir), "--saes", saes], "features.json"),
        ([*ask, "--features", loop, "--saes", saes], "to_memory"),
        ([*ask, "--features", nan, "--saes", saes], "finite"),
        ([*ask, "--features", cut, "--saes", saes], "features.json"),
        ([*ask, "--features", str(feats), "--saes", bad_d_in], "cfg.json"),
        ([*ask, "--features", str(feats), "--saes", cut_sae], "sae_weights.safetensors"),
        ([*ask, "--features", str(feats), "--saes", str(tmp / "none")], "--saes"),
    ]
    ev = ["evaluate", *good]
    out = ["--output", str(tmp / "r.json")]
    cases += [
        ([*ev, "--output", str(a_dir)], "is an existing directory"),
        ([*ev, "--output", str(a_file / "r.json")], "is a file"),
        ([*ev, *out, "--predictions", str(a_dir)], "--predictions"),
        ([*ev, *out, "--n-items", "0"], "--n-items"),
        ([*ev, *out, "--pool-size", "0"], "--pool-size"),
        ([*ev, *out, "--pool-size", "1"], "--pool-size"),
        ([*ev, *out, "--shots", "-1"], "--shots"),
        ([*ev, *out, "--dataset", str(tmp / "x.jsonl")], "is a directory"),
        ([*ev, *out, "--dataset", str(tmp / "missing.jsonl")], "no such file"),
        ([*ev, *out, "--edit-strength", "nan"], "finite"),
        ([*ev, *out, "--hyperparameters", "{bad"], "--hyperparameters"),
    ]
    configs = {
        "alpha-nan": "[to_context]\nedit_strength = nan\n",
        "alpha-inf": "[to_context]\nedit_strength = inf\n",
        "alpha-mem-nan": "[to_memory]\nedit_strength = nan\n",
        "old-one-setting-form": "edit_strength = 1.0\n",
        "pool-0": "pool_size = 0\n",
        "n-eval-0": "n_eval_items = 0\n",
        "batch-0": "batch_size = 0\n",
        "shots-empty": "[behaviours]\nshots = []\n",
        "seeds-empty": "[evaluation]\nseeds = []\n",
        "unknown-nested": "[behaviours]\nshotz = [3]\n",
        "to-memory-nan": "layers = [1]\nto_memory = { layers = [1], edit_strength = nan }\n",
        "not-toml": "edit_strength = = 2\n",
    }
    for name, body in configs.items():
        path = tmp / f"{name}.toml"
        path.write_text(body)
        cases.append((["run", str(path)], "config" if name == "not-toml" else ""))
    good_config = tmp / "good.toml"
    good_config.write_text("[to_context]\nedit_strength = 1.0\n")
    cases += [
        (["run", str(a_dir)], "is a directory"),
        (["run", str(good_config), "--output", str(a_dir)], "is an existing directory"),
        (
            [
                "import-original",
                str(tmp / "none"),
                "--layers",
                "1",
                "--proportion",
                "0.1",
                "--edit-strength",
                "nan",
                "--output",
                str(tmp / "o"),
            ],
            "finite",
        ),
        (
            [
                "import-original",
                str(tmp / "none"),
                "--layers",
                "1",
                "--proportion",
                "nan",
                "--output",
                str(tmp / "o"),
            ],
            "proportion",
        ),
        (
            [
                "import-original",
                str(tmp / "none"),
                "--layers",
                "1",
                "--proportion",
                "0.1",
                "--output",
                str(a_file),
            ],
            "is an existing file",
        ),
        (["cache", "verify", str(tmp / "none")], "no cache folder"),
        (["cache", "seal", str(a_dir)], "not a completed stage"),
    ]
    return cases


def test_bad_inputs_are_one_line_before_any_work(world, reference, tmp_path, monkeypatch, capsys):
    from spare_tl import models
    from spare_tl.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    for argv, expected in _bad_inputs(world, reference, tmp_path):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spare-tl "), (argv, err)
        assert expected in lines[0] and "Traceback" not in err, (argv, err)
        if os.environ.get("SPARE_TL_SHOW_ERRORS"):
            with capsys.disabled():
                print(lines[0])
        COUNTS["bad inputs"] += 1


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "a.toml").write_text("[to_context]\nedit_strength = nan\n")
    from spare_tl.cli import main

    with pytest.raises(ValueError, match="finite"):
        main(["--debug", "run", str(tmp_path / "a.toml")])


# --------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------


def test_zz_scenario_counts(capsys):
    """Runs last in this module: the totals of the scenarios above."""
    total = sum(COUNTS.values())
    with capsys.disabled():
        print(
            f"\nfault injection: {COUNTS['crash points']} crash points, "
            f"{COUNTS['corruptions']} corruptions, {COUNTS['bad inputs']} bad inputs"
        )
    out = os.environ.get("SPARE_TL_FAULT_COUNTS")
    if out:
        Path(out).write_text(json.dumps(COUNTS) + "\n")
    if COUNTS["crash points"] and COUNTS["corruptions"]:  # the whole module ran
        assert total >= 100
