"""Data parallelism with ``torch.distributed``: ranks, shards of work units, sealing a stage.

Launched with ``torchrun`` (``torchrun --nproc-per-node 8 -m spare_tl.cli ...``), every
process holds one replica of the model and answers its share of a stage's work units;
without ``torchrun`` the same code runs as one rank of one. The process group uses gloo on
CPUs and NCCL on GPUs (each rank on ``cuda:<LOCAL_RANK>``).

The shard protocol, on top of :mod:`spare_tl.cache`'s completion protocol:

1. every rank takes the units :func:`shard` assigns it (round robin over the stage's
   ordered units: the same split for the same world size, whatever the timing);
2. a rank's shard is a sub-stage ``<stage>/shards-<fingerprint>/rank-<r>-of-<w>/``: each
   unit is one JSON file written atomically (a unit with tensors, :class:`TensorUnit`, also
   a safetensors file, written before its JSON), so a restarted rank keeps the units it
   finished and computes only the rest; the shard's ``config.json`` (with the files'
   hashes) is written last;
3. rank 0 waits for every rank (a barrier), verifies every shard against its manifest,
   merges the units in their global order, writes the stage's own files and seals the
   stage (:func:`spare_tl.cache.mark_complete`); then the shard folders are removed, so the
   stage folder holds what a single process writes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from spare_tl import cache
from spare_tl.errors import CacheError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its
    machine). One process without ``torchrun`` is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """The ranks ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
        env = os.environ if env is None else env
        try:
            return cls(
                rank=int(env.get("RANK", 0)),
                world_size=int(env.get("WORLD_SIZE", 1)),
                local_rank=int(env.get("LOCAL_RANK", 0)),
            )
        except ValueError as e:
            raise ValueError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from e

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    """This process's :class:`Ranks` (from the process group when it is up, else the env)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        env = Ranks.from_env()
        return Ranks(dist.get_rank(), dist.get_world_size(), env.local_rank)
    return Ranks.from_env()


def device_for(r: Ranks | None = None) -> torch.device:
    """Where this rank's replica goes: ``cuda:<local_rank>`` with GPUs, else the CPU."""
    r = r or ranks()
    if torch.cuda.is_available():
        return torch.device("cuda", r.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(backend: str | None = None) -> Ranks:
    """Join the process group when launched by ``torchrun`` (gloo on CPUs, NCCL on GPUs);
    a no-op for one process or when already joined. Returns this process's ranks."""
    import torch.distributed as dist

    r = Ranks.from_env()
    if not r.distributed or dist.is_initialized():
        return ranks()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(device_for(r))
    dist.init_process_group(backend=backend, rank=r.rank, world_size=r.world_size)
    logger.info("rank %d of %d joined (%s)", r.rank, r.world_size, backend)
    return r


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def finish() -> None:
    """Leave the process group (when this process joined one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(units: Sequence[T], r: Ranks) -> list[T]:
    """The units of rank ``r``: every ``world_size``-th one from its rank on."""
    return list(units[r.rank :: r.world_size])


def shard_dir(directory: Path, config: Mapping[str, Any], r: Ranks) -> Path:
    """Rank ``r``'s shard of the stage at ``directory`` made with ``config``."""
    width = len(str(r.world_size - 1))
    return (
        Path(directory)
        / f"shards-{cache.fingerprint(config)}"
        / f"rank-{r.rank:0{width}d}-of-{r.world_size}"
    )


def unit_file(key: str, suffix: str = "json") -> str:
    """The file name of one work unit's result (``suffix``: ``safetensors`` for its tensors)."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"bad work-unit key {key!r}")
    return f"unit-{key}.{suffix}"


@dataclass(frozen=True)
class TensorUnit:
    """A work unit's result that holds tensors: ``tensors`` go to the unit's safetensors
    file, ``data`` (small, JSON-serialisable) to its JSON file."""

    tensors: Mapping[str, torch.Tensor]
    data: Any = None


@dataclass(frozen=True)
class Merged:
    """What ``merge`` returns when the stage's ``config.json`` holds more than the config
    and the manifest: ``files`` as ``{name: writer}`` and ``manifest``, the extra fields
    (``counts``, ``layers``) the one-process stage writes there."""

    files: Mapping[str, Callable[[Path], None]]
    manifest: Mapping[str, Any] = field(default_factory=dict)


def main_first(compute: Callable[[], T], r: Ranks | None = None) -> T:
    """Rank 0 runs ``compute`` first (a cached stage, written once); the other ranks wait,
    then run it too and read what rank 0 cached. One process just runs it."""
    r = r or ranks()
    if r.is_main:
        out = compute()
    barrier()
    if not r.is_main:
        out = compute()
    return out


def _write_unit(folder: Path, key: str, result: Any) -> list[str]:
    """Write one unit's files (tensors first, the JSON that marks it done last)."""
    if isinstance(result, TensorUnit):
        cache.write_tensors(folder / unit_file(key, "safetensors"), result.tensors)
        cache.write_json(folder / unit_file(key), result.data)
        return [unit_file(key, "safetensors"), unit_file(key)]
    cache.write_json(folder / unit_file(key), result)
    return [unit_file(key)]


def run_sharded(
    directory: Path,
    config: Mapping[str, Any],
    keys: Sequence[str],
    compute: Callable[[str], Any],
    merge: Callable[[list[Any]], Mapping[str, Callable[[Path], None]]],
    *,
    r: Ranks | None = None,
) -> bool:
    """Compute a stage's work units across ranks and seal it on rank 0.

    ``keys`` names the units in their global order; ``compute(key)`` returns one unit's
    JSON-serialisable result, or a :class:`TensorUnit`; ``merge(results)`` takes every
    unit's result in ``keys`` order (a tensor unit's as a :class:`TensorUnit`) and returns
    the stage's files as ``{name: writer}`` (or a :class:`Merged` with extra manifest
    fields): each writer is given the file's path and writes it atomically
    (``lambda path: cache.write_json(path, data)``). Every rank calls this; rank 0 seals the
    stage with ``config`` and returns True, the others return False once it is sealed. A
    stage already sealed with ``config`` is left as it is.
    """
    r = r or ranks()
    directory = Path(directory)
    if len(set(keys)) != len(keys):
        raise ValueError("work-unit keys must be unique")
    if cache.is_fresh(directory, config):
        return r.is_main
    if r.is_main:
        # the stage becomes incomplete before any shard is written; shards survive
        cache.begin_stage(directory)
    barrier()
    mine = shard_dir(directory, config, r)
    shard_config = {"stage": cache.fingerprint(config), "rank": r.rank, "world": r.world_size}
    if not cache.is_fresh(mine, shard_config):
        cache.begin_stage(mine)  # unit files already there are whole (written atomically)
        names = []
        for key in shard(keys, r):
            if (mine / unit_file(key)).is_file():  # finished before a restart
                if (mine / unit_file(key, "safetensors")).is_file():
                    names.append(unit_file(key, "safetensors"))
                names.append(unit_file(key))
            else:
                names += _write_unit(mine, key, compute(key))
        cache.mark_complete(mine, shard_config, files=names)
    barrier()
    if r.is_main:
        results = _gather(directory, config, keys, r.world_size)
        merged = merge(results)
        if not isinstance(merged, Merged):
            merged = Merged(merged)
        for name, write in merged.files.items():
            write(directory / name)
        cache.mark_complete(directory, config, files=list(merged.files), **merged.manifest)
        cache.verify_stage(directory)
        shutil.rmtree(directory / f"shards-{cache.fingerprint(config)}", ignore_errors=True)
    barrier()
    return r.is_main


def _gather(directory: Path, config: Mapping[str, Any], keys: Sequence[str], world: int):
    """Every unit's result in ``keys`` order, from verified shards of every rank."""
    by_key: dict[str, Any] = {}
    for rank in range(world):
        r = Ranks(rank, world)
        folder = shard_dir(directory, config, r)
        stored = cache.verify_stage(folder)  # complete, and every file as its manifest says
        expected = {"stage": cache.fingerprint(config), "rank": rank, "world": world}
        if stored["config"] != expected:
            raise CacheError(f"{folder} belongs to another run ({stored['config']})")
        for key in shard(keys, r):
            data = cache.read_json(folder / unit_file(key))
            tensors = unit_file(key, "safetensors")
            if tensors in stored["files"]:
                data = TensorUnit(cache.read_tensors(folder / tensors), data)
            by_key[key] = data
    return [by_key[key] for key in keys]
