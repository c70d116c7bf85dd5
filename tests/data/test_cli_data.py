"""``spare-tl data validate`` and ``spare-tl data stats`` through ``spare_tl.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from spare_tl.cli import main
from spare_tl.data import datasets as ds_mod

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_validate_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "validate", str(FIXTURES / "conflicts_good.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "OK, 4 items, 3 relations" in out
    assert "capital_of  2" in out and "author_of   1" in out and "(none)      1" in out


def test_validate_bad_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "validate", str(FIXTURES / "conflicts_bad.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "8 problems" in err
    assert "line 2: not valid JSON" in err
    assert "line 4, field 'sub_context': missing field" in err
    assert "line 8, field 'sub_answer': no answer in ['Marseille'] occurs in sub_context" in err


def test_validate_caps_the_listing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(["not json"] * 30) + "\n", encoding="utf-8")
    assert main(["data", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "30 problems" in err
    assert err.count("not valid JSON") == 20
    assert "... and 10 more" in err
    assert main(["data", "validate", "--max-errors", "3", str(path)]) == 1
    assert "... and 27 more" in capsys.readouterr().err


def test_validate_names_a_non_utf8_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = (FIXTURES / "conflicts_good.jsonl").read_bytes().splitlines()[0]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + "caf\xe9".encode("latin-1") + b"\n")
    assert main(["data", "validate", str(path)]) == 1
    assert "line 2: not valid UTF-8" in capsys.readouterr().err


def test_validate_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "validate", "no/such/file.jsonl"]) == 2
    assert "error" in capsys.readouterr().err


def test_stats_on_a_jsonl_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", str(FIXTURES / "conflicts_good.jsonl")]) == 0
    assert "4 items, 3 relations" in capsys.readouterr().out


def test_stats_on_a_hub_dataset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        json.loads(line)
        for line in (FIXTURES / "nqswap_dev_sample.jsonl").read_text("utf-8").splitlines()
    ]
    monkeypatch.setattr(
        ds_mod,
        "fetch_hub_split",
        lambda hub_id, split, cache_dir=None: datasets.Dataset.from_list(rows),
    )
    assert main(["data", "stats", "nqswap", "--limit", "7"]) == 0
    out = capsys.readouterr().out
    assert "nqswap: 7 items, 1 relation" in out and "(none)  7" in out


def test_stats_offline_reports_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["data", "stats", "macnoise"]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "HF_DATASETS_OFFLINE" in err
