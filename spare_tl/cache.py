"""The one place that knows the cache layout: ``cache_data/<model>/<stage>/``.

Every stage writes safetensors (tensors) and JSON/JSONL (records) beside a ``config.json``
holding the configuration that produced them. Writes go to a temporary name first and are
renamed into place, so a crash never leaves a half-written file behind. A stage is skipped
when the stored config fingerprint equals the fingerprint of the requested config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "SPARE_TL_CACHE"


def default_cache_root() -> Path:
    """``$SPARE_TL_CACHE`` if set, else the repository's committed ``cache_data/``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / "cache_data"


def model_slug(model_name: str) -> str:
    """A file-system-safe folder name for a model name or path."""
    name = (
        Path(model_name).name if ("/" in model_name and Path(model_name).exists()) else model_name
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.split("/")[-1]).strip("_") or "model"


def stage_dir(model_name: str, stage: str, root: Path | None = None) -> Path:
    """``<root>/<model>/<stage>/`` (not created)."""
    return (root or default_cache_root()) / model_slug(model_name) / stage


def fingerprint(config: Mapping[str, Any]) -> str:
    """A stable short hash of a JSON-serialisable config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def _atomic_path(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write JSON lines atomically."""
    with _atomic_path(Path(path)) as tmp, tmp.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def append_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append complete lines (used for resumable stages; a torn last line is ignored on read)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines, skipping a torn (incomplete) last line left by a killed run."""
    out: list[dict[str, Any]] = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return out


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with _atomic_path(Path(path)) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def is_fresh(directory: Path, config: Mapping[str, Any]) -> bool:
    """True when ``directory`` holds a completed stage made by an identical config."""
    cfg = Path(directory) / "config.json"
    if not cfg.exists():
        return False
    try:
        stored = read_json(cfg)
    except json.JSONDecodeError:
        return False
    return stored.get("fingerprint") == fingerprint(config) and stored.get("complete", False)


def mark_complete(directory: Path, config: Mapping[str, Any], **extra: Any) -> None:
    """Write ``config.json`` last: its presence with ``complete`` marks the stage as done."""
    write_json(
        Path(directory) / "config.json",
        {"config": dict(config), "fingerprint": fingerprint(config), "complete": True, **extra},
    )
