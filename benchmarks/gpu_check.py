"""One GPU check of spare-tl on a device machine: the environment, the steering properties on
CUDA (fp32 and bf16), speed at a real model's shape (random weights) and the NCCL path of the
sharded evaluation, in one run of a few minutes.

    python benchmarks/gpu_check.py --out DIR                       # on the GPU machine
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny   # the logic, on a CPU

Writes ``DIR/gpu_check.json`` (rewritten after every step, so a run stopped at its limit keeps
what it measured) and prints a readable log. Every step runs in its own try/except; a global
time guard (``--budget`` seconds) skips the steps that no longer fit and interrupts one that
overruns. Nothing is downloaded: models and SAEs are random, built from configs.

1. ``environment``: torch, CUDA, the GPU, and the versions (and paths) of transformer_lens,
   sae_lens, transformers, ... as imported.
2. ``correctness_<dtype>``: the properties ``tests/test_steering.py`` checks on the CPU, on the
   device with the tests' own tiny model, features and SAEs: α = 0 (or no features, or no
   direction) gives identical logits; only the last prompt position is edited; steered
   generation with a batch equals each prompt alone, and the KV cache on equals off
   (``model.generate``, TopK and JumpReLU SAEs); the pipeline's ``greedy_generate`` batched
   equals single under steering.
3. ``distributed``: ``tests/distributed_worker.py``'s tiny setup through
   :func:`spare_tl.stages.sharded.evaluate_sharded` and ``find_memorised_sharded`` under
   ``torchrun``: one rank in an NCCL group (``spare_tl.distributed.init`` is a no-op for one
   rank, so the worker joins a one-rank NCCL group itself and ``barrier``'s NCCL branch runs),
   and two ranks with gloo sharing the one GPU; each stage's files must equal, byte for byte,
   what one plain process writes.
4. ``speed_<shape>``: a random-weight ``HookedSAETransformer`` with Gemma-2-9B's config
   (TransformerLens's own, 42 layers, bf16, n_ctx 1024) and random JumpReLU SAEs of Gemma
   Scope's shape (width 131072) at 3 residual hooks: ``greedy_generate`` (prompt pass + 12
   greedy tokens) for batch sizes 1, 8, 32 with ~150-token prompts, without steering and with
   SpARE's edit (:func:`spare_tl.steer`): seconds, tokens/s, the edit's overhead and peak
   memory. Llama-3-8B's shape is the fallback when Gemma-2's cannot be built.
5. ``shared_prefix``: the evaluation's joint decoding (``generate_shared_prefix``: no steering,
   steer to context, steer to memory) at the largest batch, seconds per condition.
6. ``nccl_two_ranks_one_gpu``: whether two NCCL ranks can share one GPU (expected: NCCL refuses).

The device image has no transformer-lens or sae-lens: they travel as wheels. sae_lens imports
wandb at import time and the image has none, so when ``import wandb`` fails a stub module
(nothing here logs to wandb) is written to a temporary folder and put first on the path, for
the worker processes too; likewise for ``datasets`` if it cannot be imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import os
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

RESULT: dict = {"steps": {}}
OUT: Path | None = None
DEADLINE = float("inf")
STUBBED: dict[str, str] = {}


class TimeGuard(Exception):
    """The global time guard fired."""


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def _time_guard(signum, frame) -> None:
    raise TimeGuard("global time guard")


def remaining() -> float:
    return DEADLINE - time.monotonic()


def save() -> None:
    if OUT is None:
        return
    RESULT["saved"] = dt.datetime.now().isoformat(timespec="seconds")
    tmp = OUT / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(RESULT, indent=2, default=str) + "\n")
    tmp.replace(OUT / "gpu_check.json")


def run_step(name: str, fn, needed: float = 5.0):
    """Run ``fn`` (returning a dict) as step ``name``: record its result, error and time."""
    if remaining() < needed:
        RESULT["steps"][name] = {"status": "skipped", "reason": f"{remaining():.0f} s left"}
        log(f"== {name}: skipped ({remaining():.0f} s left, needs {needed:.0f})")
        save()
        return None
    log(f"== {name} ({remaining():.0f} s left)")
    start = time.perf_counter()
    entry: dict = {}
    try:
        out = fn() or {}
        entry = {"status": "ok", **out}
    except BaseException as e:  # noqa: BLE001 - one failure must not lose the rest
        if isinstance(e, KeyboardInterrupt):
            raise
        entry = {
            **RESULT["steps"].get(name, {}),  # what a step saved before it failed
            "status": "timeout" if isinstance(e, TimeGuard) else "error",
            "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        log(f"!! {name} failed: {entry['error']}")
        log(entry["traceback"][-1500:])
    entry["seconds"] = round(time.perf_counter() - start, 2)
    RESULT["steps"][name] = entry
    checks = {k: v for k, v in entry.get("checks", {}).items()}
    for key, value in checks.items():
        RESULT.setdefault("checks", {})[f"{name}.{key}"] = value
    log(
        f"-- {name}: {entry['status']} in {entry['seconds']} s"
        + (f"; checks {checks}" if checks else "")
    )
    save()
    _free()
    return entry


def _free() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# ------------------------------------------------------------------ imports on the device image

WANDB_STUB = '''"""Stand-in for wandb, written by benchmarks/gpu_check.py: sae_lens imports wandb at
import time and the device image has none; nothing in the check logs to wandb."""


class _Nothing:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Nothing()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Nothing()


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Nothing()
'''

DATASETS_STUB = '''"""Stand-in for datasets, written by benchmarks/gpu_check.py because the real one failed to
import; transformer_lens and sae_lens import names from it at import time, none is used here."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})
'''


def prepare_imports(force_stub: bool = False) -> None:
    """Stub wandb (and datasets, if broken) when they cannot be imported; for subprocesses too."""
    failures = {}
    for name in ("wandb", "datasets"):
        if force_stub and name == "wandb":
            failures[name] = "stub forced (--stub-wandb)"
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            failures[name] = f"{type(e).__name__}: {e}"[:300]
    if not failures:
        return
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-stubs-"))
    for name, why in failures.items():
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        pkg = folder / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text(WANDB_STUB if name == "wandb" else DATASETS_STUB)
        if name == "datasets":
            for sub in ("arrow_dataset", "iterable_dataset", "load", "dataset_dict", "fingerprint"):
                (pkg / f"{sub}.py").write_text(DATASETS_STUB)
        STUBBED[name] = why
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    log(f"stubbed {sorted(failures)} from {folder}: {failures}")


# ------------------------------------------------------------------ 1. environment


def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    info: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "stubbed": dict(STUBBED),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            capability=list(torch.cuda.get_device_capability(0)),
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
        )
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        if shutil.which("nvidia-smi"):
            q = "name,driver_version,memory.total,clocks.max.sm"
            done = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    packages = {}
    for module, dist in [
        ("transformer_lens", "transformer-lens"),
        ("sae_lens", "sae-lens"),
        ("transformers", "transformers"),
        ("huggingface_hub", "huggingface-hub"),
        ("tokenizers", "tokenizers"),
        ("datasets", "datasets"),
        ("safetensors", "safetensors"),
        ("einops", "einops"),
        ("jaxtyping", "jaxtyping"),
        ("numpy", "numpy"),
        ("accelerate", "accelerate"),
        ("wandb", "wandb"),
    ]:
        entry: dict = {}
        try:
            m = importlib.import_module(module)
            entry["version"] = getattr(m, "__version__", None)
            entry["path"] = str(Path(getattr(m, "__file__", "") or "?").parent)
        except Exception as e:  # noqa: BLE001
            entry["import_error"] = f"{type(e).__name__}: {e}"[:300]
        with contextlib.suppress(Exception):
            entry["dist_version"] = md.version(dist)
        packages[module] = entry
    info["packages"] = packages
    import spare_tl

    info["spare_tl"] = str(Path(spare_tl.__file__).parent)
    for k, v in info.items():
        if k != "packages":
            log(f"   {k}: {v}")
    for k, v in packages.items():
        log(f"   {k}: {v}")
    return info


# ------------------------------------------------------------------ 2. correctness on the device


def _first_mismatch(a, b) -> list[int]:
    rows = [i for i in range(min(len(a), len(b))) if not _equal(a[i], b[i])]
    return rows


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def correctness(device: str, dtype_name: str) -> dict:
    import test_steering as ts  # tests/test_steering.py: the CPU tests' own helpers
    import torch

    from spare_tl.generation import greedy_generate
    from spare_tl.methods.spare import resid_post_hook_name, steer
    from spare_tl.testing import tiny_model

    dtype = getattr(torch, dtype_name)
    model = tiny_model(seed=0)
    model.to(device, print_details=False)
    model.to(dtype, print_details=False)

    def saes(architecture: str) -> dict:
        return {
            k: v.to(device=device, dtype=dtype)
            for k, v in ts.make_saes(architecture, layers=ts.LAYERS).items()
        }

    checks: dict = {}
    details: dict = {"model_device": str(model.cfg.device), "model_dtype": str(model.cfg.dtype)}

    # α = 0, no features, no direction: identical logits
    tokens = model.to_tokens(ts.PROMPTS, padding_side="left")
    base = model(tokens)
    topk = saes("topk")
    same = []
    for features, alpha in [
        (ts.make_features(), 0.0),
        (ts.make_features(n_context=0, n_memory=0), 3.0),
    ]:
        with steer(model, features, "context", topk, edit_strength=alpha):
            same.append(bool(torch.equal(model(tokens), base)))
    for direction in (None, "none"):
        with steer(model, ts.make_features(), direction, topk):
            same.append(bool(torch.equal(model(tokens), base)))
    with steer(model, ts.make_features(), "context", topk, edit_strength=3.0):
        steered = model(tokens)
    checks["zero_strength_is_identity"] = all(same)
    details["identity_cases"] = same
    checks["edit_changes_logits"] = not bool(torch.equal(steered, base))
    details["edit_max_logit_change"] = float((steered.float() - base.float()).abs().max())

    # only the last prompt position is edited
    single = model.to_tokens(ts.PROMPTS[3])
    names = [resid_post_hook_name(layer) for layer in range(model.cfg.n_layers)]
    _, before = model.run_with_cache(single, names_filter=names)
    with steer(model, ts.make_features(), "context", topk):
        _, after = model.run_with_cache(single, names_filter=names)
    ok = True
    for layer, name in enumerate(names):
        if layer < min(ts.LAYERS):
            ok &= bool(torch.equal(after[name], before[name]))
        else:
            ok &= bool(torch.equal(after[name][:, :-1], before[name][:, :-1]))
            ok &= not bool(torch.equal(after[name][:, -1], before[name][:, -1]))
    checks["only_last_prompt_position_edited"] = ok

    # model.generate under steering: batch = single, KV cache on = off (TopK and JumpReLU)
    for architecture in ("topk", "jumprelu"):
        features, the_saes = ts.make_features(), saes(architecture)
        unsteered = model.generate(ts.PROMPTS, **ts.GEN)
        with steer(model, features, "context", the_saes) as steering:
            batched = model.generate(ts.PROMPTS, **ts.GEN)
            no_cache = model.generate(ts.PROMPTS, use_past_kv_cache=False, **ts.GEN)
            singles = [model.generate(p, **ts.GEN)[0, -8:] for p in ts.PROMPTS]
        new = batched[:, -8:]
        bad_single = _first_mismatch(list(new), singles)
        bad_cache = _first_mismatch(list(batched), list(no_cache))
        checks[f"generate_batch_equals_single_{architecture}"] = not bad_single
        checks[f"generate_cache_on_equals_off_{architecture}"] = not bad_cache
        checks[f"generate_steering_changes_tokens_{architecture}"] = not bool(
            torch.equal(new.cpu(), unsteered[:, -8:].cpu())
        )
        calls = sorted({s.calls for s in steering.stats.values()})
        rows = sorted({s.rows_edited for s in steering.stats.values()})
        checks[f"generate_edit_counts_{architecture}"] = calls == [13] and rows == [40]
        details[f"generate_{architecture}"] = {
            "rows_batch_ne_single": bad_single,
            "rows_cache_on_ne_off": bad_cache,
            "edit_calls": calls,
            "rows_edited": rows,
        }

    # the pipeline's greedy_generate under steering: batched = single
    for architecture in ("topk", "jumprelu"):
        features, the_saes = ts.make_features(), saes(architecture)
        kwargs = dict(max_new_tokens=8, stop_at_newline=False, progress=False)
        unsteered = greedy_generate(model, ts.PROMPTS, batch_size=4, **kwargs)
        with steer(model, features, "memory", the_saes):
            batched = greedy_generate(model, ts.PROMPTS, batch_size=4, **kwargs)
            singles = [greedy_generate(model, [p], batch_size=1, **kwargs)[0] for p in ts.PROMPTS]
        checks[f"greedy_generate_batch_equals_single_{architecture}"] = batched == singles
        checks[f"greedy_generate_steering_changes_{architecture}"] = batched != unsteered
        if batched != singles:
            details[f"greedy_generate_{architecture}_mismatch"] = {
                "batched": batched,
                "singles": singles,
            }
    if device.startswith("cuda"):
        details["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"checks": checks, "details": details}


# ------------------------------------------------------------------ 3. distributed


def _tiny_setup(device: str):
    import distributed_worker  # tests/distributed_worker.py: the CPU test's own setup

    model, features, saes, items, pool = distributed_worker.tiny_setup(6)
    model.to(device, print_details=False)
    return model, features, saes, items, pool


def dist_worker(args) -> None:
    """One rank under torchrun: the sharded evaluation and memorised set of the tiny setup."""
    import torch

    torch.set_grad_enabled(False)
    if args.device == "cpu":
        torch.set_num_threads(1)
    import distributed_worker
    import torch.distributed as dist

    from spare_tl import distributed
    from spare_tl.stages.evaluation import EvaluationConfig
    from spare_tl.stages.sharded import evaluate_sharded, find_memorised_sharded

    out = Path(args.out)
    start = time.perf_counter()
    backend = None if args.backend == "auto" else args.backend
    r = distributed.init(backend)
    joined_here = False
    if not r.distributed and args.force_group:
        # spare_tl.distributed.init is a no-op for one rank: join a one-rank group here, so
        # that barrier() takes the backend's branch (NCCL: device_ids=[current device])
        if args.backend == "nccl":
            torch.cuda.set_device(distributed.device_for(r))
        dist.init_process_group(backend=args.backend, rank=r.rank, world_size=r.world_size)
        joined_here = True
    r = distributed.ranks()
    device = str(distributed.device_for(r)) if args.device != "cpu" else "cpu"
    model, features, saes, items, pool = _tiny_setup(device)
    config = EvaluationConfig(seeds=(0, 1, 2), max_new_tokens=6)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate_sharded(
        model,
        items,
        pool,
        out / "eval",
        features=features,
        saes=saes,
        config=config,
        progress=False,
    )
    eval_s = time.perf_counter() - start
    find_memorised_sharded(
        model,
        distributed_worker.MEMORISED_ITEMS(),
        cache_root=out / "mem",
        **distributed_worker.MEM,
    )
    info = {
        "rank": r.rank,
        "world": r.world_size,
        "group": dist.is_initialized(),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "joined_one_rank_group_in_worker": joined_here,
        "device": str(model.cfg.device),
        "setup_seconds": round(setup_s, 2),
        "evaluate_sharded_seconds": round(eval_s, 2),
        "n_predictions": len(result.predictions),
    }
    info["scan"] = _scan(model, items, pool, out, r.is_main)
    (out / f"worker-rank{r.rank}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    distributed.finish()


def _scan(model, items, pool, out: Path, main: bool) -> dict:
    """The sharded steerability scan of the tiny setup, where this checkout has one
    (``scan_sharded``): its result, less the run's time, to ``out/scan-result.json``."""
    import distributed_worker

    import spare_tl.stages.sharded as sharded

    if not (hasattr(sharded, "scan_sharded") and hasattr(distributed_worker, "SCAN")):
        return {"status": "absent"}
    start = time.perf_counter()
    try:
        result = sharded.scan_sharded(
            model, items, pool, distributed_worker.SCAN, root=out / "scan", progress=False
        )
        if main:
            data = {**result.to_json(), "seconds": None, "machine": None}
            (out / "scan-result.json").write_text(json.dumps(data, sort_keys=True, default=str))
        return {"status": "ok", "seconds": round(time.perf_counter() - start, 2)}
    except Exception as e:  # noqa: BLE001 - the evaluation's comparison must survive
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:1000]}


def _torchrun(nproc: int, backend: str, out: Path, device: str, force_group: bool, timeout: float):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env.setdefault("NCCL_DEBUG", "WARN")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(Path(__file__).resolve()),
        "--dist-worker",
        "--out",
        str(out),
        "--backend",
        backend,
        "--device",
        device,
    ] + (["--force-group"] if force_group else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT)
        )
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = round(time.perf_counter() - start, 1)
    log(f"   torchrun x{nproc} {backend}: rc={rc} in {seconds} s")
    if rc != 0:
        log("   stderr tail:\n" + stderr[-2500:])
    workers = {}
    for path in sorted(out.glob("worker-rank*.json")):
        workers[path.stem] = json.loads(path.read_text())
    return {
        "rc": rc,
        "seconds": seconds,
        "workers": workers,
        "stdout_tail": stdout[-1500:],
        "stderr_tail": stderr[-3000:] if rc != 0 else stderr[-600:],
    }


def _stage_files(root: Path, names: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """The files under a stage folder by relative path: all, or those named ``names`` (the
    evaluation's config.json records timing.json's hash, and timing.json holds times)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (names is None or p.name in names)
    }


EVAL_FILES = ("summary.json", "predictions.jsonl")


def distributed_check(device: str, runs: list[str], work: Path) -> dict:
    import distributed_worker
    import torch

    from spare_tl.stages.evaluation import EvaluationConfig
    from spare_tl.stages.memorised import find_memorised
    from spare_tl.stages.sharded import evaluate_sharded

    # the reference: one plain process (no torchrun, no process group)
    ref = work / "one-process"
    start = time.perf_counter()
    model, features, saes, items, pool = _tiny_setup(device)
    config = EvaluationConfig(seeds=(0, 1, 2), max_new_tokens=6)
    one = evaluate_sharded(
        model,
        items,
        pool,
        ref / "eval",
        features=features,
        saes=saes,
        config=config,
        progress=False,
    )
    find_memorised(
        model,
        distributed_worker.MEMORISED_ITEMS(),
        cache_root=ref / "mem",
        progress=False,
        **distributed_worker.MEM,
    )
    reference = {"eval": _stage_files(ref / "eval", EVAL_FILES), "mem": _stage_files(ref / "mem")}
    scan_ref = _scan(model, items, pool, ref, True)
    if (ref / "scan-result.json").exists():
        reference["scan"] = {"scan-result.json": (ref / "scan-result.json").read_bytes()}
    out: dict = {
        "reference_seconds": round(time.perf_counter() - start, 2),
        "reference_distinct_memory_answers": len(
            {r["steer_to_memory.prediction"] for r in one.predictions}
        ),
        "reference_files": {k: sorted(v) for k, v in reference.items()},
        "reference_scan": scan_ref,
        "runs": {},
        "checks": {},
    }
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    for run in runs:  # e.g. "nccl1": NCCL, one rank; "gloo2": gloo, two ranks
        backend, nproc = run.rstrip("0123456789"), int(run[len(run.rstrip("0123456789")) :])
        if remaining() < 45:
            out["runs"][run] = {"status": "skipped", "reason": f"{remaining():.0f} s left"}
            continue
        folder = work / run
        res = _torchrun(
            nproc,
            backend,
            folder,
            device,
            force_group=nproc == 1,
            timeout=min(120, remaining() - 20),
        )
        same = {}
        if res["rc"] == 0:
            for stage in reference:
                if stage == "scan":
                    got = _stage_files(folder, ("scan-result.json",))
                else:
                    got = _stage_files(folder / stage, EVAL_FILES if stage == "eval" else None)
                differ = sorted(
                    k
                    for k in set(got) | set(reference[stage])
                    if got.get(k) != reference[stage].get(k)
                )
                same[stage] = differ or "identical"
        res["same_as_one_process"] = same
        out["runs"][run] = res
        out["checks"][f"{run}_ran"] = res["rc"] == 0
        out["checks"][f"{run}_equals_one_process"] = res["rc"] == 0 and all(
            v == "identical" for v in same.values()
        )
        log(f"   {run}: {same}")
    return out


def nccl_two_ranks(device: str, work: Path) -> dict:
    """Two NCCL ranks on the one GPU: NCCL is expected to refuse (duplicate GPU)."""
    res = _torchrun(
        2, "nccl", work / "nccl2", device, force_group=False, timeout=min(75, remaining() - 10)
    )
    text = res["stderr_tail"] + res["stdout_tail"]
    res["duplicate_gpu_message"] = "Duplicate GPU" in text or "duplicate GPU" in text.lower()
    return res


# ------------------------------------------------------------------ 4. speed at a real shape

GEMMA2_9B = dict(  # TransformerLens's own config of google/gemma-2-9b (the fallback if unreadable)
    model_name="gemma-2-9b",
    original_architecture="Gemma2ForCausalLM",
    d_model=3584,
    d_head=256,
    n_heads=16,
    d_mlp=14336,
    n_layers=42,
    n_ctx=1024,
    eps=1e-06,
    d_vocab=256000,
    act_fn="gelu_pytorch_tanh",
    initializer_range=0.02,
    normalization_type="RMS",
    rotary_base=10000.0,
    rotary_dim=256,
    positional_embedding_type="rotary",
    use_attn_scale=True,
    n_key_value_heads=8,
    window_size=4096,
    use_local_attn=True,
    attn_types=["local", "global"] * 21,
    attn_scores_soft_cap=50.0,
    output_logits_soft_cap=30.0,
    gated_mlp=True,
    final_rms=True,
    use_normalization_before_and_after=True,
    default_prepend_bos=True,
)
LLAMA3_8B = dict(
    model_name="llama-3-8b",
    original_architecture="LlamaForCausalLM",
    d_model=4096,
    d_head=128,
    n_heads=32,
    d_mlp=14336,
    n_layers=32,
    n_ctx=1024,
    eps=1e-05,
    d_vocab=128256,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=128,
    rotary_base=500000.0,
    rotary_adjacent_pairs=False,
    n_key_value_heads=8,
    gated_mlp=True,
    final_rms=True,
    default_prepend_bos=True,
)
SHAPES = {"gemma-2-9b": (GEMMA2_9B, "google/gemma-2-9b"), "llama-3-8b": (LLAMA3_8B, None)}
TINY = dict(d_model=256, d_head=64, n_heads=4, n_key_value_heads=2, d_mlp=512, n_layers=4)


def real_config(shape: str, device: str, dtype, tiny: bool):
    from transformer_lens import HookedTransformerConfig

    hand, official = SHAPES[shape]
    source = "hand-written"
    cfg = None
    if official:
        try:
            from transformer_lens.loading_from_pretrained import get_pretrained_model_config

            cfg = get_pretrained_model_config(official, dtype=dtype, n_ctx=1024, device=device)
            source = f"transformer_lens get_pretrained_model_config({official!r})"
        except Exception as e:  # noqa: BLE001
            log(
                f"   TransformerLens's config of {official} unreadable ({e}); using the hand-written one"
            )
    if cfg is None:
        cfg = HookedTransformerConfig(**hand, device=device, dtype=dtype)
    overrides: dict = dict(
        init_weights=True, seed=0, tokenizer_name=None, device=device, dtype=dtype
    )
    if tiny:
        n_layers = TINY["n_layers"]
        overrides.update(TINY, d_vocab=4096, d_vocab_out=4096, rotary_dim=TINY["d_head"])
        if cfg.attn_types is not None:
            overrides["attn_types"] = list(cfg.attn_types[:n_layers])
    return dataclasses.replace(cfg, **overrides), source


def real_sae(hook_name: str, d_in: int, d_sae: int, device: str, dtype_name: str, seed: int):
    """A random JumpReLU SAE of Gemma Scope's shape, built on the device (like testing.tiny_sae)."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    layer = int(hook_name.split(".")[1])
    meta = SAEMetadata(hook_name=hook_name, model_name="random", hook_layer=layer, prepend_bos=True)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype=dtype_name, device=device, metadata=meta)
    sae = JumpReLUSAE(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
        sae.threshold.fill_(0.05)
    sae.eval()
    return sae


def real_features(model_name: str, layers, d_sae: int, n: int = 64):
    import torch

    from spare_tl.features import FunctionalFeatures, LayerFeatures
    from spare_tl.methods.spare import resid_post_hook_name

    out = {}
    for layer in layers:
        g = torch.Generator().manual_seed(layer)
        ids = torch.randperm(d_sae, generator=g)
        out[layer] = LayerFeatures(
            layer=layer,
            hook_name=resid_post_hook_name(layer),
            context_features=ids[:n],
            memory_features=ids[n : 2 * n],
            context_activations=torch.rand(d_sae, generator=g) * 4,
            memory_activations=torch.rand(d_sae, generator=g) * 4,
        )
    return FunctionalFeatures(model_name=model_name, layers=out, proportion=0.1, edit_strength=2.0)


class DecodeTimer:
    """Wraps spare_tl.generation._greedy_steps: the decoding's time and tokens of each call."""

    def __init__(self, sync):
        import spare_tl.generation as generation

        self.generation = generation
        self.original = generation._greedy_steps
        self.sync = sync
        self.calls: list[dict] = []

    def __enter__(self):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            new = self.original(*args, **kwargs)
            self.sync()
            self.calls.append(
                {
                    "seconds": time.perf_counter() - start,
                    "shape": list(new.shape),
                    "tokens": new.cpu(),
                }
            )
            return new

        self.generation._greedy_steps = timed
        return self

    def __exit__(self, *exc):
        self.generation._greedy_steps = self.original


def _prompts(n: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + "     ,."
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]


def speed(shape: str, device: str, tiny: bool, batches: list[int], reps: int, state: dict) -> dict:
    import torch
    from sae_lens import HookedSAETransformer

    from spare_tl.generation import _tokenize, greedy_generate
    from spare_tl.methods.spare import resid_post_hook_name, steer
    from spare_tl.testing import tiny_tokenizer

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    dtype = torch.bfloat16
    out: dict = {"shape": shape, "tiny": tiny}
    cfg, out["config_source"] = real_config(shape, device, dtype, tiny)
    out["config"] = {
        k: getattr(cfg, k)
        for k in (
            "d_model",
            "n_layers",
            "n_heads",
            "n_key_value_heads",
            "d_head",
            "d_mlp",
            "d_vocab",
            "n_ctx",
            "act_fn",
        )
    }
    out["config"].update(
        dtype=str(cfg.dtype), n_params=cfg.n_params, use_local_attn=cfg.use_local_attn
    )
    tok = tiny_tokenizer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with torch.device(device):  # random init on the device, not 10 B numbers on the CPU
            model = HookedSAETransformer(cfg, tokenizer=tok)
        out["built_on"] = device
    except Exception as e:  # noqa: BLE001
        log(
            f"   building under torch.device({device!r}) failed ({e}); building on the CPU, then moving"
        )
        model = HookedSAETransformer(cfg, tokenizer=tok)
        out["built_on"] = f"cpu then {device} ({type(e).__name__})"
    model.eval()
    state["model"] = model
    sync()
    out["build_seconds"] = round(time.perf_counter() - start, 2)
    out["params"] = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    out["param_device_dtype"] = f"{first.device} {first.dtype}"
    n_layers = cfg.n_layers
    layers = (
        [1, 2, 3]
        if tiny
        else ([23, 24, 25] if n_layers > 26 else [n_layers // 2 + i for i in range(3)])
    )
    d_sae = 1024 if tiny else 131072
    start = time.perf_counter()
    saes = {
        layer: real_sae(resid_post_hook_name(layer), cfg.d_model, d_sae, device, "bfloat16", layer)
        for layer in layers
    }
    sync()
    out["sae"] = {"architecture": "jumprelu", "d_sae": d_sae, "layers": layers, "dtype": "bfloat16"}
    out["sae_build_seconds"] = round(time.perf_counter() - start, 2)
    features = real_features(cfg.model_name, layers, d_sae)
    if cuda:
        out["weights_memory_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    log(
        f"   built {shape} ({out['params'] / 1e9:.2f} B params, {out['param_device_dtype']}) in "
        f"{out['build_seconds']} s; SAEs {out['sae_build_seconds']} s; {out.get('weights_memory_gib')} GiB"
    )

    prompt_chars = 40 if tiny else 150
    new_tokens = 12
    conditions = {
        "none": contextlib.nullcontext,
        "spare": lambda: steer(model, features, "context", saes),
    }
    out["prompt_tokens"] = len(_tokenize(model, _prompts(1, prompt_chars, 0))[0])  # BOS included
    out["new_tokens"] = new_tokens
    out["batches"] = {}
    for b in batches:
        per_run_guess = state.get("last_run_seconds", 2.0) * max(1.0, b / state.get("last_b", b))
        needed = per_run_guess * 2 * (reps + 1) + 10
        if remaining() < needed:
            out["batches"][str(b)] = {
                "status": "skipped",
                "reason": f"{remaining():.0f} s left, needs ~{needed:.0f}",
            }
            log(f"   batch {b}: skipped ({remaining():.0f} s left)")
            continue
        try:
            prompts = _prompts(b, prompt_chars, seed=b)
            runs: dict = {name: [] for name in conditions}
            tokens_of: dict = {}
            edit_rows: list = []
            for rep in range(reps + 1):  # the first of each: warm-up
                for name, ctx in conditions.items():
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    with DecodeTimer(sync) as timer:
                        sync()
                        start = time.perf_counter()
                        with ctx() as steering:
                            greedy_generate(
                                model,
                                prompts,
                                batch_size=b,
                                max_new_tokens=new_tokens,
                                stop_at_newline=False,
                                progress=False,
                            )
                        sync()
                        total = time.perf_counter() - start
                    call = timer.calls[-1]
                    run = {
                        "seconds": total,
                        "decode_seconds": call["seconds"],
                        "prompt_seconds": total - call["seconds"],
                        "steps": call["shape"][1],
                    }
                    if cuda:
                        run["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    if steering is not None:
                        edit_rows = sorted({s.rows_edited for s in steering.stats.values()})
                    tokens_of[name] = call["tokens"]
                    if rep > 0 or reps == 0:
                        runs[name].append(run)
            state["last_run_seconds"] = statistics.median(r["seconds"] for r in runs["none"])
            state["last_b"] = b
            state.setdefault("batches_done", []).append(b)
            entry: dict = {}
            for name, rs in runs.items():
                med = {
                    k: statistics.median(r[k] for r in rs)
                    for k in ("seconds", "decode_seconds", "prompt_seconds")
                }
                steps = rs[0]["steps"]
                entry[name] = {
                    "seconds": round(med["seconds"], 4),
                    "all_seconds": [round(r["seconds"], 4) for r in rs],
                    "prompt_seconds": round(med["prompt_seconds"], 4),
                    "decode_seconds": round(med["decode_seconds"], 4),
                    "steps": steps,
                    "new_tokens_per_s": round(b * steps / med["seconds"], 1),
                    "prompt_tokens_per_s": round(
                        b * out["prompt_tokens"] / med["prompt_seconds"], 1
                    ),
                    "ms_per_decode_step": round(
                        1000 * med["decode_seconds"] / max(1, steps - 1), 2
                    ),
                }
                if cuda:
                    entry[name]["peak_memory_gib"] = round(max(r["peak_memory_gib"] for r in rs), 2)
            entry["spare_overhead"] = round(entry["spare"]["seconds"] / entry["none"]["seconds"], 4)
            entry["spare_prompt_overhead"] = round(
                entry["spare"]["prompt_seconds"] / entry["none"]["prompt_seconds"], 4
            )
            changed = (tokens_of["spare"] != tokens_of["none"]).any(1)
            entry["rows_with_changed_tokens"] = int(changed.sum())
            entry["edit_rows_edited_per_layer"] = edit_rows
            out["batches"][str(b)] = entry
            log(
                f"   batch {b:3d}: none {entry['none']['seconds']:.3f} s "
                f"({entry['none']['new_tokens_per_s']} new tok/s, {entry['none']['ms_per_decode_step']} ms/step, "
                f"prompt {entry['none']['prompt_seconds']:.3f} s), spare {entry['spare']['seconds']:.3f} s, "
                f"overhead x{entry['spare_overhead']}, peak {entry['spare'].get('peak_memory_gib')} GiB, "
                f"changed rows {entry['rows_with_changed_tokens']}/{b}"
            )
        except TimeGuard:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest batch
            out["batches"][str(b)] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:1000]}
            log(f"   batch {b}: {type(e).__name__}: {str(e)[:300]}")
            _free()
        save_partial = RESULT["steps"].setdefault(f"speed_{shape}", {"status": "running"})
        save_partial.update(out)
        save()
    state.update(features=features, saes=saes, prompt_chars=prompt_chars)
    peaks = [
        v[name]["peak_memory_gib"]
        for v in out["batches"].values()
        for name in conditions
        if name in v and "peak_memory_gib" in v[name]
    ]
    out["max_memory_allocated_gib"] = max(peaks) if peaks else None
    out["checks"] = {
        "edit_changes_tokens": any(
            v.get("rows_with_changed_tokens", 0) > 0 for v in out["batches"].values() if "none" in v
        )
    }
    return out


def shared_prefix(b: int, state: dict) -> dict:
    """The evaluation's joint decoding: three conditions sharing each batch's prompt pass."""
    from spare_tl.generation import generate_shared_prefix
    from spare_tl.methods.spare import steer

    model, features, saes = state["model"], state["features"], state["saes"]
    prompts = _prompts(b, state["prompt_chars"], seed=1000 + b)
    conditions = {
        "no_steering": None,
        "steer_to_context": lambda rows: steer(model, features, "context", saes),
        "steer_to_memory": lambda rows: steer(model, features, "memory", saes),
    }
    out = {"batch": b, "runs": []}
    for _ in range(2):  # warm-up, then timed
        seconds: dict = {}
        start = time.perf_counter()
        generate_shared_prefix(
            model,
            prompts,
            conditions,
            seconds=seconds,
            batch_size=b,
            max_new_tokens=12,
            stop_at_newline=False,
            progress=False,
        )
        if model.cfg.device and str(model.cfg.device).startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        out["runs"].append(
            {
                "total": round(time.perf_counter() - start, 4),
                **{k: round(v, 4) for k, v in seconds.items()},
            }
        )
    log(f"   shared prefix, batch {b}: {out['runs'][-1]}")
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    global OUT, DEADLINE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="shrink the real-shape part (a CPU dry run)"
    )
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for the whole check")
    parser.add_argument("--shape", default="gemma-2-9b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dist-runs", default=None, help="e.g. nccl1,gloo2 (backend + ranks)")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip")
    parser.add_argument("--stub-wandb", action="store_true", help="stub wandb even if installed")
    # internal: one torchrun rank
    parser.add_argument("--dist-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--force-group", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.dist_worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        prepare_imports()
        dist_worker(args)
        return

    start_wall = time.monotonic()
    DEADLINE = start_wall + args.budget
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, _time_guard)
    signal.setitimer(signal.ITIMER_REAL, args.budget + 20)
    RESULT.update(
        started=dt.datetime.now().isoformat(timespec="seconds"),
        argv=sys.argv[1:],
        budget_seconds=args.budget,
    )
    # nothing can be fetched on the device machine: never wait on the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    prepare_imports(force_stub=args.stub_wandb)
    import torch

    torch.set_grad_enabled(False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)
    cuda = device.startswith("cuda")
    skip = set(filter(None, args.skip.split(",")))
    # 128 last: measured only when the time guard leaves room for it
    default_batches = [1, 4] if args.tiny else ([1, 8, 32, 128] if cuda else [1, 8, 32])
    batches = [int(x) for x in args.batches.split(",")] if args.batches else default_batches
    reps = args.reps if args.reps is not None else (1 if args.tiny else 3)
    dist_runs = (
        args.dist_runs.split(",") if args.dist_runs else (["nccl1", "gloo2"] if cuda else ["gloo1"])
    )
    RESULT["device"] = device
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    run_step("environment", lambda: environment(device), needed=1)
    for dtype_name in ("float32", "bfloat16"):
        if f"correctness_{dtype_name}" not in skip:
            run_step(
                f"correctness_{dtype_name}", lambda d=dtype_name: correctness(device, d), needed=20
            )
    if "distributed" not in skip:
        run_step("distributed", lambda: distributed_check(device, dist_runs, work), needed=60)

    state: dict = {}
    if "speed" not in skip:
        entry = run_step(
            f"speed_{args.shape}",
            lambda: speed(args.shape, device, args.tiny, batches, reps, state),
            needed=60,
        )
        if (
            entry
            and entry["status"] != "ok"
            and not state.get("last_b")
            and args.shape != "llama-3-8b"
        ):
            state.clear()
            _free()
            run_step(
                "speed_llama-3-8b",
                lambda: speed("llama-3-8b", device, args.tiny, batches, reps, state),
                needed=60,
            )
    if "shared_prefix" not in skip and state.get("last_b"):
        b = max([x for x in state["batches_done"] if x <= 32] or [state["last_b"]])
        run_step("shared_prefix", lambda: shared_prefix(b, state), needed=40)
    state.clear()
    _free()
    if cuda and "nccl2" not in skip and torch.cuda.device_count() == 1:
        run_step("nccl_two_ranks_one_gpu", lambda: nccl_two_ranks(device, work), needed=40)

    signal.setitimer(signal.ITIMER_REAL, 0)
    RESULT["total_seconds"] = round(time.monotonic() - start_wall, 1)
    RESULT["failed_checks"] = sorted(k for k, v in RESULT.get("checks", {}).items() if not v)
    save()
    log("== summary")
    statuses = {name: step.get("status") for name, step in RESULT["steps"].items()}
    log(f"   steps: {statuses}")
    log(f"   failed checks: {RESULT['failed_checks'] or 'none'}")
    for name, step in RESULT["steps"].items():
        if name.startswith("speed_") and step.get("batches"):
            for b, e in step["batches"].items():
                if "none" in e:
                    log(
                        f"   {name} batch {b}: none {e['none']['seconds']} s, spare {e['spare']['seconds']} s "
                        f"(x{e['spare_overhead']}), {e['none']['new_tokens_per_s']} new tok/s, "
                        f"peak {e['spare'].get('peak_memory_gib')} GiB"
                    )
    log(f"   total {RESULT['total_seconds']} s; JSON: {OUT / 'gpu_check.json'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
