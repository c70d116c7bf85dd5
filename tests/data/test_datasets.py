"""Reading user JSONL files, and the loaders of the built-in and hub datasets (offline)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import datasets
import pytest

from spare_tl.data import datasets as ds_mod
from spare_tl.data.datasets import (
    MACNOISE_HUB_ID,
    NQSWAP_HUB_ID,
    load_dataset,
    macnoise_to_items,
    nqswap_to_items,
)
from spare_tl.data.schema import (
    ConflictItem,
    read_conflict_jsonl,
    validate_conflict_jsonl,
    write_conflict_jsonl,
)
from spare_tl.data.scoring import behaviour_label
from spare_tl.errors import DatasetError, DatasetUnavailableError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NQSWAP_COLUMNS = ["question", "org_context", "org_answer", "sub_context", "sub_answer"]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text("utf-8").splitlines()]


def _hf(name: str) -> datasets.Dataset:
    """A fixture as an in-memory ``datasets.Dataset`` (the type the hub returns)."""
    return datasets.Dataset.from_list(_rows(name))


# ---------------------------------------------------------------- JSONL validation


def test_read_good_file() -> None:
    items = read_conflict_jsonl(FIXTURES / "conflicts_good.jsonl")
    assert len(items) == 4
    assert items[2].org_answer == ("William Shakespeare", "Shakespeare")
    assert [i.relation for i in items] == ["capital_of", "capital_of", "author_of", ""]
    report = validate_conflict_jsonl(FIXTURES / "conflicts_good.jsonl")
    assert report.ok
    assert report.relations == {"capital_of": 2, "author_of": 1, "": 1}


def test_bad_file_lists_every_problem_with_line_and_field() -> None:
    report = validate_conflict_jsonl(FIXTURES / "conflicts_bad.jsonl")
    assert len(report.items) == 1  # line 1 is fine
    found = {(e.line, e.field) for e in report.errors}
    assert found == {
        (2, None),
        (3, None),
        (4, "sub_context"),
        (5, "org_answer"),
        (6, "sub_answer"),
        (7, "question"),
        (8, "sub_answer"),
        (9, "org_context"),
    }
    text = {e.line: str(e) for e in report.errors}
    assert "not valid JSON" in text[2]
    assert "expected a JSON object, got array" in text[3]
    assert "missing field" in text[4]
    assert "expected a list of strings, got string" in text[5]
    assert "empty answer list" in text[6]
    assert "empty string" in text[7]
    assert "occurs in sub_context" in text[8]
    assert "expected a string, got number" in text[9]
    with pytest.raises(DatasetError) as exc:
        read_conflict_jsonl(FIXTURES / "conflicts_bad.jsonl")
    assert len(exc.value.problems) == 8
    assert "line 8, field 'sub_answer'" in str(exc.value)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_bytes(data)
    return path


GOOD = {
    "question": "Who wrote Hamlet?",
    "org_context": "Hamlet was written by William Shakespeare.",
    "org_answer": ["William Shakespeare"],
    "sub_context": "Hamlet was written by Jane Austen.",
    "sub_answer": ["Jane Austen"],
}


def test_non_utf8_line_is_named(tmp_path: Path) -> None:
    line = json.dumps(GOOD).encode()
    bad = json.dumps({**GOOD, "question": "Who wrote Hamlet? X"}).encode().replace(b"X", b"\xff")
    path = _write(tmp_path, line + b"\n" + bad + b"\n" + line + b"\n")
    report = validate_conflict_jsonl(path)
    assert len(report.items) == 2
    [err] = report.errors
    assert err.line == 2 and "not valid UTF-8" in err.message and "0xff" in err.message


def test_answer_checks_use_normalisation(tmp_path: Path) -> None:
    rows = [
        {**GOOD, "org_answer": ["the william shakespeare!"]},  # normalises into the context
        {**GOOD, "sub_context": GOOD["org_context"], "sub_answer": ["William Shakespeare"]},
        {**GOOD, "org_answer": ["The"]},  # normalises to nothing
        {**GOOD, "org_answer": ["Marlowe", "Shakespeare"]},  # one candidate is enough
    ]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in rows).encode())
    report = validate_conflict_jsonl(path)
    assert [e.line for e in report.errors] == [2, 3]
    assert "not a conflict" in str(report.errors[0])
    assert "normalises to an empty string" in str(report.errors[1])


def test_bom_blank_lines_unknown_keys_and_round_trip(tmp_path: Path) -> None:
    row = {**GOOD, "relation": "author_of", "id": "q1", "extra": {"note": 1}}
    path = _write(tmp_path, b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n\n  \n")
    [item] = read_conflict_jsonl(path)
    assert item.extra == {"note": 1, "id": "q1"}
    out = tmp_path / "out.jsonl"
    write_conflict_jsonl([item], out)
    assert read_conflict_jsonl(out) == [item]


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no items"):
        read_conflict_jsonl(_write(tmp_path, b"\n"))


def test_wrong_types_in_optional_fields(tmp_path: Path) -> None:
    row = {**GOOD, "relation": 3, "extra": [], "sub_answer": ["Jane Austen", 7]}
    report = validate_conflict_jsonl(_write(tmp_path, json.dumps(row).encode()))
    assert {e.field for e in report.errors} == {"relation", "extra", "sub_answer"}


# ---------------------------------------------------------------- hub mappings


def test_fixtures_have_the_hub_column_layout() -> None:
    for name in ("nqswap_dev_sample.jsonl", "macnoise_sample.jsonl"):
        hf = _hf(name)
        assert hf.column_names == NQSWAP_COLUMNS
        assert len(hf) == 12
        assert hf.features["org_answer"].feature.dtype == "string"  # a list of strings


def test_nqswap_mapping() -> None:
    items = nqswap_to_items(_hf("nqswap_dev_sample.jsonl"))
    assert len(items) == 12
    first = items[0]
    assert isinstance(first, ConflictItem)
    assert first.org_answer == ("Timothy B. Schmit",)
    assert first.relation == ""
    assert first.extra == {"source": "nqswap", "index": 0}
    assert [i.extra["index"] for i in items] == list(range(12))
    assert all(not i.extra.get("em_in_context") for i in items)
    assert behaviour_label("Yuliya Snigir", first) == "context"


def test_macnoise_mapping_uses_in_context_em() -> None:
    items = macnoise_to_items(_hf("macnoise_sample.jsonl"))
    assert len(items) == 12
    assert all(i.extra["em_in_context"] and i.extra["source"] == "macnoise" for i in items)
    pp = items[0]
    assert pp.sub_answer == ("Charlotte Brontë",)
    # In-context score: any span of sub_context counts as a context answer.
    assert behaviour_label("English author Charlotte Brontë", pp) == "context"
    assert behaviour_label("Jane Austen", pp) == "memory"


def test_mapping_accepts_bare_string_answers_and_rejects_missing_columns() -> None:
    row = {**GOOD, "org_answer": "William Shakespeare"}
    [item] = nqswap_to_items([row])
    assert item.org_answer == ("William Shakespeare",)
    with pytest.raises(DatasetError, match="sub_context"):
        nqswap_to_items([{k: v for k, v in GOOD.items() if k != "sub_context"}])


def test_mapping_skips_rows_without_answers() -> None:
    items = macnoise_to_items([GOOD, {**GOOD, "sub_answer": []}, GOOD])
    assert [i.extra["index"] for i in items] == [0, 2]


# ---------------------------------------------------------------- load_dataset dispatch


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Serve the fixtures in place of the hub; record what was asked for."""
    calls: list[tuple] = []
    files = {NQSWAP_HUB_ID: "nqswap_dev_sample.jsonl", MACNOISE_HUB_ID: "macnoise_sample.jsonl"}

    def fetch(hub_id: str, split: str, cache_dir: object = None) -> datasets.Dataset:
        calls.append((hub_id, split, cache_dir))
        return _hf(files[hub_id])

    monkeypatch.setattr(ds_mod, "fetch_hub_split", fetch)
    return calls


@pytest.mark.parametrize(
    ("name", "hub_id", "split"),
    [
        ("nqswap", NQSWAP_HUB_ID, "dev"),
        ("pminervini/NQ-Swap", NQSWAP_HUB_ID, "dev"),
        ("macnoise", MACNOISE_HUB_ID, "train_chatgpt[:5120]"),
        ("GWHed/dataset_macnoise", MACNOISE_HUB_ID, "train_chatgpt[:5120]"),
    ],
)
def test_load_dataset_dispatches_hub_names(
    fake_hub: list[tuple], name: str, hub_id: str, split: str
) -> None:
    items = load_dataset(name, limit=5)
    assert len(items) == 5
    assert fake_hub == [(hub_id, split, None)]
    assert items[0].extra.get("em_in_context", False) is (hub_id == MACNOISE_HUB_ID)


def test_load_dataset_passes_split_and_cache_dir(fake_hub: list[tuple], tmp_path: Path) -> None:
    items = load_dataset("nqswap", split="original", cache_dir=tmp_path)
    assert len(items) == 12
    assert fake_hub == [(NQSWAP_HUB_ID, "original", tmp_path)]


def test_load_dataset_jsonl_path() -> None:
    assert len(load_dataset(FIXTURES / "conflicts_good.jsonl")) == 4
    assert len(load_dataset(str(FIXTURES / "conflicts_good.jsonl"), limit=2)) == 2
    with pytest.raises(DatasetError):
        load_dataset(FIXTURES / "conflicts_bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_dataset("no/such/file.jsonl")
    with pytest.raises(ValueError, match="split applies only"):
        load_dataset(FIXTURES / "conflicts_good.jsonl", split="dev")


def test_load_dataset_builtin_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    item = read_conflict_jsonl(FIXTURES / "conflicts_good.jsonl")[0]

    def load_builtin(version: str = "v1") -> list[ConflictItem]:
        seen.append(version)
        return [item] * 3

    fake = types.ModuleType("spare_tl.data.builtin")
    fake.load_builtin = load_builtin  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spare_tl.data.builtin", fake)
    assert load_dataset("builtin") == [item] * 3
    assert load_dataset("builtin:v2", limit=1) == [item]
    assert seen == ["v1", "v2"]


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'squad'"):
        load_dataset("squad")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("nqswap", limit=-1)


def test_offline_and_not_cached_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError(
            "Couldn't reach 'pminervini/NQ-Swap' on the Hub (OfflineModeIsEnabled)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError) as exc:
        load_dataset("nqswap")
    message = str(exc.value)
    assert "not in the local Hugging Face cache" in message
    assert "HF_DATASETS_OFFLINE" in message and "JSONL" in message
    assert isinstance(exc.value, FileNotFoundError)  # the CLI reports it as an error


def test_offline_with_the_real_datasets_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No mock of ``load_dataset``: offline mode and an empty cache give the clear error."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetUnavailableError, match="not in the local Hugging Face cache"):
        load_dataset("macnoise", cache_dir=tmp_path / "empty-cache")
