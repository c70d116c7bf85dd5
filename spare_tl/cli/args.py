"""What the commands share: ``--dtype``, loading a model in it, and the checks that run
before a model is loaded (validate before compute: a bad path or dataset costs seconds, not
a finished evaluation).

CLI-only helpers live here (the top floor); the argument checks of :mod:`spare_tl.checks` and
the layer syntax of :mod:`spare_tl.layer_spec` stay on the ground floor (the stages use them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from spare_tl import checks
from spare_tl.errors import ArgumentError
from spare_tl.hardware import DTYPES, resolve_dtype


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype {auto,float32,bfloat16}`` for a command that runs the model."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="model parameter dtype; auto: bf16 on a GPU, float32 on a CPU (bf16 did not "
        "give fp32's answers on a CPU, docs/benchmarks.md)",
    )


def load_model_for(model_name: str, dtype: Any = "auto", **kwargs: Any):
    """:func:`spare_tl.models.load_model` with a ``--dtype`` value resolved."""
    from spare_tl.models import load_model

    return load_model(model_name, dtype=resolve_dtype(dtype, kwargs.get("device", "cpu")), **kwargs)


def check_dataset(name: str, option: str = "--dataset") -> int:
    """Load the dataset ``name`` before the model is loaded, so that a missing or damaged
    file, a hub dataset that is not cached or an empty set fails here; returns its size."""
    from spare_tl.data.datasets import load_dataset

    checks.non_empty(name, option)
    if Path(name).is_dir():
        raise ArgumentError(f"{option} {name} is a directory, not a .jsonl file")
    if name.lower().endswith(".jsonl") and not Path(name).is_file():
        raise ArgumentError(f"{option} {name}: no such file")
    items = load_dataset(name)
    if not items:
        raise ArgumentError(f"{option} {name} holds no items")
    return len(items)


def check_steering_folders(features: str | Path, saes: str | Path) -> None:
    """``--features`` holds a ``features.json`` and ``--saes`` is a folder of SAEs whose
    configs fit their weights; checked before the model is loaded."""
    if not (Path(features) / "features.json").is_file():
        raise ArgumentError(
            f"--features {features} holds no features.json: give a functional-feature "
            "folder (made by `spare-tl features` or `spare-tl import-original`)"
        )
    checks.sae_folders(saes)
