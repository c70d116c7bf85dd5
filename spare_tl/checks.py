"""Argument checks that run before any work: numbers, counts, strings and output paths.

Each returns the checked value or raises :class:`~spare_tl.errors.ArgumentError` (a
``ValueError``) whose message names the argument and says what would be accepted.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from spare_tl.errors import ArgumentError


def finite_non_negative(value: Any, name: str = "edit strength α") -> float:
    """``value`` as a float if it is a finite number >= 0."""
    try:
        x = float(value)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"{name} must be a number, got {value!r}") from e
    if not math.isfinite(x) or x < 0:
        raise ArgumentError(
            f"{name} must be a finite number >= 0, got {value}"
            + ("; the paper uses 1.0-3.0 and 0 turns steering off" if "α" in name else "")
        )
    return x


def at_least(value: Any, minimum: int, name: str) -> int:
    """``value`` as an int if it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return value


def non_empty(value: Any, name: str) -> str:
    """``value`` if it is a string with something other than white space."""
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(f"{name} is empty; give some text")
    return value


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can really be created in ``folder`` (made and removed at once): unlike
    ``os.access``, this also catches read-only mounts and pseudo file systems such as /proc."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".spare-tl-check-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def output_file(path: str | os.PathLike[str], name: str = "--output") -> Path:
    """A path a file can be written to: not a directory, in a writable (or creatable) folder."""
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(
            f"{name} {path} is an existing directory; give a file path, e.g. {path / 'out.json'}"
        )
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ArgumentError(f"{name} {path}: {base} is a file, so no folder can be made there")
    if not _can_create_in(base):
        raise ArgumentError(f"{name} {path}: the folder {base} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ArgumentError(f"{name} {path} exists and is not writable")
    return path


def output_dir(path: str | os.PathLike[str], name: str = "--output") -> Path:
    """A path a folder can be written to: not an existing file, writable or creatable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArgumentError(
            f"{name} {path} is an existing file; give a folder path (it is created if missing)"
        )
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ArgumentError(f"{name} {path}: {base} is a file, so no folder can be made there")
    if not _can_create_in(base):
        raise ArgumentError(f"{name} {path}: {base} is not writable")
    return path


def sae_folders(path: str | os.PathLike[str], name: str = "--saes") -> Path:
    """A folder of SAE folders whose ``cfg.json`` files parse and whose weights' shapes
    agree with their ``d_in`` / ``d_sae`` (read from the safetensors headers only)."""
    path = Path(path)
    if not path.is_dir():
        raise ArgumentError(f"{name} {path} is not a folder of SAEs (one folder per hook)")
    for sub in sorted(path.iterdir()):
        if (sub / "cfg.json").is_file():
            sae_files(sub)
    return path


def sae_files(folder: Path) -> None:
    """Check one SAELens SAE folder before it is loaded (see :func:`sae_folders`)."""
    import json

    from safetensors import SafetensorError, safe_open

    cfg_path = Path(folder) / "cfg.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ArgumentError(
            f"{cfg_path} is not a valid SAE cfg ({type(e).__name__}: {e}); it needs d_in and d_sae"
        ) from e
    weights = Path(folder) / "sae_weights.safetensors"
    if not weights.is_file():
        return  # another layout (sparsify): its loader checks it
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise ArgumentError(
            f"{weights} is not a readable safetensors file ({e}); it is truncated or damaged"
        ) from e
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise ArgumentError(
                f"{cfg_path} says d_in {d_in}, d_sae {d_sae}, but {weights} holds {key} of "
                f"shape {list(shapes[key])}: the cfg does not belong to these weights"
            )
