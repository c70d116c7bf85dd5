"""What the machine can do fast: the CPU's bf16 matrix units, and the dtype ``auto`` picks.

bf16 can pay off on a CPU only with native bf16 matrix instructions: Intel AMX
(``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``); without them PyTorch emulates bf16 matmuls.
``--dtype auto`` picks bf16 on a CUDA device and fp32 on every CPU (see :func:`resolve_dtype`);
every benchmark prints what the CPU has.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

DTYPES = ("auto", "float32", "bfloat16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """The CPU's model name, core count and its bf16-relevant flags (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    return {
        "model": model,
        "cores": torch.get_num_threads(),
        "bf16_flags": [f for f in BF16_FLAGS if f in flags],
        "amx_tile": "amx_tile" in flags,
    }


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU has native bf16 matrix instructions (AMX or AVX-512 BF16)."""
    return bool(cpu_info()["bf16_flags"])


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``float32``, ``bfloat16``, or for ``auto``: bf16 on CUDA, fp32 on a CPU.

    On CPUs bf16 stays opt-in (``--dtype bfloat16``) until the bf16/fp32 parity report
    (issue 17: ≥ 98 % equal answers) holds: on a 2-core AMD EPYC with AVX-512 BF16 and no AMX,
    48 held-out prompts × 3 conditions already differed (docs/benchmarks.md)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def describe() -> str:
    """One line for benchmark output: the CPU, threads and bf16 support."""
    info = cpu_info()
    flags = ", ".join(info["bf16_flags"]) or "none"
    return (
        f"CPU {info['model']}, {info['cores']} torch threads, bf16 matrix flags: {flags} "
        f"(dtype auto -> {str(resolve_dtype('auto')).removeprefix('torch.')})"
    )
