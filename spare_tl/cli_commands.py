"""CLI subcommands for the SpARE pipeline stages (wired by :mod:`spare_tl.cli`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the pipeline subcommands."""
