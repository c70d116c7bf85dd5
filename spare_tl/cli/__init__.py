"""Floor 5 (the top), cli: the ``spare-tl`` command line, one subcommand per stage plus helpers.

Every subcommand lives in this package (``spare_tl/cli/``, the top floor: it may import any
floor below); this module only wires them. A registrar
is ``register(subparsers)`` that adds one or more parsers whose ``func(args) -> int`` runs
the command. Imports stay lazy so ``spare-tl --help`` is fast.

Every anticipated failure (a bad argument or config, a damaged or truncated cache file, an
SAE that does not fit, a path that is a directory or a file where the other is wanted) is
printed as one line, ``spare-tl <command>: error: <what, which file, the fix>``, with exit
code 2; ``--debug`` prints the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# "module:function" registrars; each adds its subcommand(s).
REGISTRARS: list[str] = [
    "spare_tl.cli.commands:register",
    "spare_tl.cli.demo:register",
    "spare_tl.cli.original:register",
    "spare_tl.cli.data:register",
    "spare_tl.cli.train_saes:register",
    "spare_tl.cli.report:register",
    "spare_tl.cli.scan:register",
    "spare_tl.cli.sweep:register",
    "spare_tl.cli.studies:register",
    "spare_tl.cli.baselines:register",
    "spare_tl.cli.probes:register",
    "spare_tl.cli.docs:register",
    "spare_tl.cli.cache:register",
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
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (and log at DEBUG)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for spec in REGISTRARS:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        message = error_line(e)
        if message is None or args.debug:
            raise
        print(f"spare-tl {args.command}: error: {message}", file=sys.stderr)
        return 2


def error_line(e: BaseException) -> str | None:
    """The one-line message for an anticipated failure, or None for a bug (re-raised)."""
    from safetensors import SafetensorError

    text = " ".join(str(e).split())
    if isinstance(e, SafetensorError):
        return (
            f"a safetensors file is truncated or damaged ({text}); run `spare-tl cache verify` "
            "to find it, then restore or delete it"
        )
    if isinstance(e, RecursionError):
        return (
            "a file refers to itself (e.g. features.json whose to_memory is '.'): fix the "
            "reference or re-create the file (--debug shows where)"
        )
    if isinstance(e, IsADirectoryError):
        return f"{_path_of(e)} is a directory, but a file is needed there; give a file path"
    if isinstance(e, NotADirectoryError):
        return f"{_path_of(e)}: a file is in the way of a folder; give a folder path"
    if isinstance(e, FileExistsError):
        return f"{_path_of(e)} already exists and is in the way; remove it or choose another path"
    if isinstance(e, PermissionError):
        return f"{_path_of(e)} cannot be written or read (permission denied)"
    if isinstance(e, RuntimeError) and (
        "size mismatch" in text or "Error(s) in loading state_dict" in text
    ):
        return (
            "an SAE's weights do not match its cfg.json (d_in / d_sae): "
            f"{text.split(' size mismatch ')[0][:300]}; fix cfg.json or use the matching weights"
        )
    if isinstance(e, KeyError):
        return f"missing key {text}"
    if isinstance(e, (ValueError, FileNotFoundError, OSError)):
        return text
    return None


def _path_of(e: OSError) -> str:
    return str(e.filename) if e.filename else str(e)


if __name__ == "__main__":
    sys.exit(main())
