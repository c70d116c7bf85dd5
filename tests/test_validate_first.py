"""Validate before compute: every command that loads a model checks its output paths, its
dataset and its config first, and fails in one line (exit 2) without loading the model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import spare_tl.models
from spare_tl.cli import main

UNWRITABLE = "/proc/none"  # no file can be created under /proc, even by root


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Make loading a model a test failure, and keep the cache in ``tmp_path``."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(spare_tl.models, "load_model", refuse)
    monkeypatch.setenv("SPARE_TL_CACHE", str(tmp_path / "cache"))
    return refuse


@pytest.fixture
def empty(tmp_path) -> str:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return str(path)


def _config(tmp_path: Path, dataset: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(f'dataset = "{dataset}"\n')
    return str(path)


def _cases(tmp_path: Path, empty: str) -> dict[str, tuple[list[str], str]]:
    """command name -> (argv, a word the one-line error must contain)."""
    good = _config(tmp_path, "builtin")
    (tmp_path / "bad").mkdir()
    bad = _config(tmp_path / "bad", empty)
    return {
        "evaluate-output": (["evaluate", "--output", f"{UNWRITABLE}/r.json"], "not writable"),
        "evaluate-dataset": (
            ["evaluate", "--output", str(tmp_path / "r.json"), "--dataset", empty],
            "no items",
        ),
        "run-output": (["run", good, "--output", f"{UNWRITABLE}/r.json"], "not writable"),
        "run-dataset": (["run", bad], "no items"),
        "memorised": (["memorised", bad], "no items"),
        "behaviours": (["behaviours", bad], "no items"),
        "activations": (["activations", bad], "no items"),
        "statistics": (["statistics", bad], "no items"),
        "features": (["features", bad], "no items"),
        "steer": (
            ["steer", "--context", "c", "--question", "q", "--features", UNWRITABLE],
            "holds no features.json",
        ),
        "demo": (["demo", "--report", f"{UNWRITABLE}/report.html"], "not writable"),
        "scan": (["scan", bad], "no items"),
        "scan-figure": (["scan", good, "--figure", f"{UNWRITABLE}/s.html"], "not writable"),
        "sweep": (["sweep", good, "--output", f"{UNWRITABLE}/sweep"], "not writable"),
        "sweep-dataset": (["sweep", bad], "no items"),
        "attribution": (["attribution", bad], "no items"),
        "conflict-table": (["conflict-table", "--output", f"{UNWRITABLE}/t.md"], "not writable"),
        "train-saes": (["train-saes", "--output", f"{UNWRITABLE}/saes"], "not writable"),
        "train-saes-dataset": (["train-saes", "--dataset", empty], "no items"),
        "probes": (["probes", "--figure", f"{UNWRITABLE}/p.html"], "not writable"),
        "probes-dataset": (["probes", "--dataset", empty], "no items"),
        "baselines-sweep": (
            ["baselines", "sweep", "--method", "cad", "--output", f"{UNWRITABLE}/s.json"],
            "not writable",
        ),
        "baselines-table": (["baselines", "table", "--dataset", empty], "no items"),
        "results": (["results", "--n-items", "0"], "--n-items"),
    }


CASES = [
    "evaluate-output",
    "evaluate-dataset",
    "run-output",
    "run-dataset",
    "memorised",
    "behaviours",
    "activations",
    "statistics",
    "features",
    "steer",
    "demo",
    "scan",
    "scan-figure",
    "sweep",
    "sweep-dataset",
    "attribution",
    "conflict-table",
    "train-saes",
    "train-saes-dataset",
    "probes",
    "probes-dataset",
    "baselines-sweep",
    "baselines-table",
    "results",
]


@pytest.mark.parametrize("case", CASES)
def test_a_command_checks_its_inputs_before_loading_the_model(
    case, tmp_path, empty, no_model, capsys
):
    argv, word = _cases(tmp_path, empty)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err, err
    assert err.startswith(f"spare-tl {argv[0]}: error: ")


def test_every_model_command_has_a_case():
    from spare_tl.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    no_model = {"report", "docs", "cache", "data", "import-original", "upgrade-cache"}
    no_model |= {"sae-metrics"}
    covered = {c.split("-output")[0].split("-dataset")[0].split("-figure")[0] for c in CASES}
    covered = {"baselines" if c.startswith("baselines") else c for c in covered}
    assert commands - no_model <= covered, sorted(commands - no_model - covered)


def test_evaluate_to_an_unwritable_path_fails_in_seconds():
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "spare_tl.cli", "evaluate", "--output", f"{UNWRITABLE}/r.json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.time() - start
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not writable" in out.stderr and elapsed < 15, (elapsed, out.stderr)
