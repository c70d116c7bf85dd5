"""The ``spare-tl`` command line: one subcommand per pipeline stage plus helpers.

Each subcommand lives beside the code it drives; this module only wires them. A registrar
is ``register(subparsers)`` that adds one or more parsers whose ``func(args) -> int`` runs
the command. Imports stay lazy so ``spare-tl --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# "module:function" registrars; each adds its subcommand(s).
REGISTRARS: list[str] = [
    "spare_tl.cli_commands:register",
    "spare_tl.original:register",
    "spare_tl.data.cli:register",
    "spare_tl.train_saes:register",
    "spare_tl.report:register",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spare-tl",
        description=(
            "SpARE for TransformerLens + SAELens: find the SAE features that make a model "
            "answer from its context or from its parametric memory, and steer them."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for spec in REGISTRARS:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"spare-tl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
