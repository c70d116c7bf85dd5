"""The one place that knows the cache layout: ``cache_data/<model>/<stage>/``.

Every stage writes safetensors (tensors) and JSON/JSONL (records) beside a ``config.json``
holding the configuration that produced them. The **completion protocol**:

1. :func:`begin_stage` removes the stage's ``config.json``: from here on the stage is
   incomplete, so a crash can never leave an old ``config.json`` vouching for new data;
2. every file is written to a temporary name and renamed into place (never half-written),
   readable by the group like any other file (mode ``0666 & ~umask``);
3. :func:`mark_complete` writes ``config.json`` **last**, with a manifest: each data file's
   size and SHA-256.

A stage is reused (:func:`is_fresh`) only when its config fingerprint equals the requested
one *and* every file matches the manifest (hashed once per process per file version); any
mismatch (truncated, flipped bytes, missing) is a :class:`~spare_tl.errors.CacheError`
naming the file, never a silent recompute or a silent load. ``spare-tl cache verify``
hashes a whole cache; ``spare-tl cache seal`` adds a manifest to a stage written before
manifests existed (after you have checked it is good).

Resumable stages append whole units to a log (:func:`append_jsonl`); on resume the reader
keeps only the units whose row count is complete and rewrites the log without the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from spare_tl.errors import CacheError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "SPARE_TL_CACHE"
CONFIG = "config.json"
MANIFEST = "files"  # the manifest's key in config.json (and in features.json)


def default_cache_root() -> Path:
    """Where stages are read and written: ``$SPARE_TL_CACHE`` if set; in a source checkout,
    its committed ``cache_data/``; for an installed package, the user's cache folder
    ``~/.cache/spare-tl`` (beside the converted models), never site-packages.
    The embedded model's shipped data is found apart from this (:mod:`spare_tl.embedded`)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "cache_data").is_dir():
        return REPO_ROOT / "cache_data"
    return Path.home() / ".cache" / "spare-tl"


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


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def _file_mode() -> int:
    """``0666`` less the process umask: what ``open()`` would give a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


@contextmanager
def _atomic_path(path: Path):
    """A temporary path beside ``path``; on success it is flushed to disk, given the usual
    file mode and renamed onto ``path`` (never a half-written ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def write_file_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Produce ``path`` with ``write(tmp)`` (any writer, given a temporary path beside it),
    then rename: a crash leaves the old file or none, never half of a new one."""
    with _atomic_path(Path(path)) as tmp:
        write(tmp)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a damaged one is a :class:`CacheError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); the file is damaged") from e


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write JSON lines atomically."""
    with _atomic_path(Path(path)) as tmp, tmp.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def append_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append complete lines to a resume log (flushed to disk). A crash can leave a torn
    last line or half a unit: the reader of the log must check units (see
    :func:`read_jsonl` with ``allow_torn_tail`` and the stage's own row counts)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, *, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    """Read JSON lines.

    A file must end with a newline and every line must parse; otherwise it was cut off or
    damaged, a :class:`CacheError` naming the file and line. Resume logs pass
    ``allow_torn_tail=True``: there the text after the last newline (a record a killed run
    did not finish) is dropped, and nothing else.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise CacheError(f"{path} is not valid UTF-8 ({e}); the file is damaged") from e
    if text and not text.endswith("\n"):
        if not allow_torn_tail:
            raise CacheError(
                f"{path} ends in the middle of a line: the file was cut off (truncated); "
                "delete its stage folder to recompute it"
            )
        text = text[: text.rfind("\n") + 1]
    out: list[dict[str, Any]] = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CacheError(f"{path} line {i} is not valid JSON ({e}); the file is damaged") from e
    return out


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically, byte-identical for identical tensors and
    metadata (the header's JSON keys sorted: safetensors itself orders metadata at random)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(clean, metadata=dict(metadata) if metadata else None)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    canonical = header.encode()
    if len(canonical) <= n:  # same content, so never longer; pad as safetensors does
        data = data[:8] + canonical + b" " * (n - len(canonical)) + data[8 + n :]
    with _atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a damaged one is a :class:`CacheError` naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CacheError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or damaged"
        ) from e


# --------------------------------------------------------------------------------------
# Manifests and the completion protocol
# --------------------------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, computed once per process per (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of one file: its size and SHA-256."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def data_files(directory: Path) -> list[str]:
    """The files a stage folder holds: regular, not hidden (temporaries), not config.json."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name != CONFIG
    )


def manifest(directory: Path, files: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` for ``files`` (names relative to ``directory``)."""
    return {name: file_entry(Path(directory) / name) for name in sorted(files)}


def check_manifest(directory: Path, entries: Mapping[str, Any], source: Path) -> None:
    """Every file in ``entries`` exists with its recorded size and SHA-256, or a
    :class:`CacheError` naming the first that does not."""
    directory = Path(directory)
    fix = f"delete {directory} to recompute it (or restore it, e.g. `git checkout {directory}`)"
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            raise CacheError(f"{path} is missing, but {source} lists it; {fix}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CacheError(
                f"{path} has {size} bytes, {source} says {entry['size']}: the file was "
                f"truncated or replaced; {fix}"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CacheError(
                f"{path} does not match the SHA-256 in {source}: the file is damaged "
                f"or was changed after the stage completed; {fix}"
            )


def begin_stage(directory: Path) -> None:
    """Mark a stage incomplete before writing any of its files (removes ``config.json``)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).unlink(missing_ok=True)


def mark_complete(
    directory: Path,
    config: Mapping[str, Any],
    *,
    files: Iterable[str] | None = None,
    **extra: Any,
) -> None:
    """Write ``config.json`` last, with the manifest of ``files`` (default: every file in
    the folder, see :func:`data_files`): its presence with ``complete`` marks the stage done."""
    directory = Path(directory)
    names = data_files(directory) if files is None else list(files)
    write_json(
        directory / CONFIG,
        {
            "config": dict(config),
            "fingerprint": fingerprint(config),
            "complete": True,
            **extra,
            MANIFEST: manifest(directory, names),
        },
    )


def read_stage_config(directory: Path) -> dict[str, Any] | None:
    """The stage's ``config.json``, or None when it is missing (the stage is incomplete)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return None
    return read_json(path)


def verify_stage(directory: Path) -> dict[str, Any]:
    """Check a completed stage against its manifest; returns its ``config.json``.

    Raises :class:`CacheError` naming the file when the stage is incomplete, unsealed
    (written before manifests) or any file differs from the manifest.
    """
    directory = Path(directory)
    stored = read_stage_config(directory)
    if stored is None or not stored.get("complete", False):
        raise CacheError(
            f"{directory} is not a completed stage ({CONFIG} missing or not complete); "
            "run the stage again to complete it"
        )
    if MANIFEST not in stored:
        raise CacheError(
            f"{directory / CONFIG} has no file manifest (written by an older spare-tl); if the "
            f"stage is known to be good, seal it with `spare-tl cache seal {directory}`, "
            "otherwise delete the folder to recompute it"
        )
    check_manifest(directory, stored[MANIFEST], directory / CONFIG)
    return stored


def verify_file(path: Path) -> None:
    """Check one stage file against the manifest in the ``config.json`` beside it."""
    path = Path(path)
    stored = read_stage_config(path.parent)
    if stored is None:
        raise CacheError(
            f"{path}: its stage has no {CONFIG} (incomplete); run the stage again to complete it"
        )
    entries = stored.get(MANIFEST)
    if entries is None:
        verify_stage(path.parent)  # raises: unsealed
    if path.name not in entries:
        raise CacheError(f"{path} is not listed in {path.parent / CONFIG}; it is not stage data")
    check_manifest(path.parent, {path.name: entries[path.name]}, path.parent / CONFIG)


def is_fresh(directory: Path, config: Mapping[str, Any]) -> bool:
    """True when ``directory`` holds a completed stage made by an identical config and every
    file matches its manifest; False when it is missing, incomplete or made by another config.
    A completed stage of this config whose files do not match raises :class:`CacheError`."""
    directory = Path(directory)
    try:
        stored = read_stage_config(directory)
    except CacheError as e:
        logger.warning("%s; the stage counts as incomplete", e)
        return False
    if stored is None or not isinstance(stored, dict):
        return False
    if stored.get("fingerprint") != fingerprint(config) or not stored.get("complete", False):
        return False
    verify_stage(directory)
    return True


def seal_stage(directory: Path, *, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Migration: add the manifest to a completed stage written before manifests existed.

    Only for a stage already known to be good (e.g. committed results whose tests pass):
    the manifest vouches for the files as they are now. ``config`` replaces the stored
    config (and its fingerprint) when a newer spare-tl records more in it. Data files are
    never changed. Returns the new ``config.json`` content.
    """
    directory = Path(directory)
    stored = read_stage_config(directory)
    if stored is None or not stored.get("complete", False):
        raise CacheError(f"{directory} is not a completed stage; nothing to seal")
    if config is not None:
        stored["config"] = dict(config)
        stored["fingerprint"] = fingerprint(config)
    stored.pop(MANIFEST, None)
    stored[MANIFEST] = manifest(directory, data_files(directory))
    write_json(directory / CONFIG, stored)
    return stored


# --------------------------------------------------------------------------------------
# Checking a whole cache
# --------------------------------------------------------------------------------------


def _manifest_sources(root: Path) -> Iterable[Path]:
    """Every ``config.json`` of a stage and every ``features.json`` under ``root``."""
    for path in sorted(Path(root).rglob("*.json")):
        if path.name in (CONFIG, "features.json") and not any(
            part.startswith(".") for part in path.relative_to(root).parts
        ):
            yield path


def verify_cache(root: Path) -> tuple[list[str], list[str], list[str]]:
    """Hash every file that a manifest under ``root`` lists.

    Returns (verified sources, problems, sources without a manifest); never changes a file.
    """
    ok: list[str] = []
    problems: list[str] = []
    unsealed: list[str] = []
    for source in _manifest_sources(Path(root)):
        try:
            stored = read_json(source)
        except CacheError as e:
            problems.append(str(e))
            continue
        if not isinstance(stored, dict) or (
            source.name == CONFIG and "fingerprint" not in stored and MANIFEST not in stored
        ):
            continue  # some other JSON called config.json (e.g. a model's config)
        if MANIFEST not in stored:
            unsealed.append(str(source))
            continue
        if source.name == CONFIG and not stored.get("complete", False):
            problems.append(f"{source.parent} is incomplete ({CONFIG} not marked complete)")
            continue
        try:
            check_manifest(source.parent, stored[MANIFEST], source)
        except CacheError as e:
            problems.append(str(e))
            continue
        ok.append(str(source))
    return ok, problems, unsealed
