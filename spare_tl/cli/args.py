"""Arguments shared by the commands: ``--dtype`` and loading a model in it.

CLI-only helpers live here (the top floor); the checks they run before any work are
:mod:`spare_tl.checks` and the layer syntax :mod:`spare_tl.layer_spec`, which the stages use
too.
"""

from __future__ import annotations

import argparse
from typing import Any

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
