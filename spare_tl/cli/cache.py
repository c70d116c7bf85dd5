"""``spare-tl cache verify|seal``: check the cache's files against their manifests."""

from __future__ import annotations

import argparse
from pathlib import Path

from spare_tl.cache import MANIFEST, default_cache_root, read_json, seal_stage, verify_cache


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``spare-tl cache verify`` and ``spare-tl cache seal``."""
    p = sub.add_parser("cache", help="verify the cache's files against their manifests, or seal")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    v = cache_sub.add_parser(
        "verify", help="hash every file a stage manifest lists and report (changes nothing)"
    )
    v.add_argument("root", nargs="?", default=None, help="cache folder (default: cache_data/)")
    v.set_defaults(func=_verify_command)
    s = cache_sub.add_parser(
        "seal",
        help="add a manifest to a completed stage written before manifests (known-good only)",
    )
    s.add_argument("directories", nargs="+", help="stage folders holding a complete config.json")
    s.set_defaults(func=_seal_command)


def _verify_command(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else default_cache_root()
    if not root.is_dir():
        raise FileNotFoundError(f"no cache folder at {root}")
    ok, problems, unsealed = verify_cache(root)
    n_files = sum(len(read_json(Path(s)).get(MANIFEST, {})) for s in ok)
    print(f"{root}: {len(ok)} stages verified ({n_files} files hashed)")
    for source in unsealed:
        print(f"unsealed (no manifest): {source}")
    for problem in problems:
        print(f"BAD: {problem}")
    return 2 if problems else 0


def _seal_command(args: argparse.Namespace) -> int:
    for directory in args.directories:
        stored = seal_stage(Path(directory))
        print(f"sealed {directory}: {len(stored[MANIFEST])} files")
    return 0
