from __future__ import annotations

from spare_tl.data.schema import ConflictItem
from spare_tl.stages import memorised as memorised_mod
from spare_tl.stages.memorised import (
    MemorisedSet,
    closed_book_demonstrations,
    dataset_key,
    find_memorised,
)
from spare_tl.studies.conflict_table import to_markdown


def _items(n: int) -> list[ConflictItem]:
    return [
        ConflictItem(f"q{i}?", f"It is m{i}.", (f"m{i}",), f"It is c{i}.", (f"c{i}",), f"r{i % 3}")
        for i in range(n)
    ]


def test_demonstrations_are_other_questions_of_the_same_relation():
    items = _items(12)
    demos = closed_book_demonstrations(items, 2, seed=0)
    for it, ds in zip(items, demos):
        assert len(ds) == 2
        assert all(d.relation == it.relation and d.question != it.question for d in ds)
    assert demos == closed_book_demonstrations(items, 2, seed=0)


def test_find_memorised_scores_cached_and_filters(tiny_model, tmp_path, monkeypatch):
    items = _items(9)

    # a model that "knows" every third answer
    def fake(model, prompts, **kwargs):
        nums = [int(p.split("question: q")[-1].split("?")[0]) for p in prompts]
        return [f"m{i}" if i % 3 == 0 else "no idea" for i in nums]

    monkeypatch.setattr(memorised_mod, "greedy_generate", fake)
    result = find_memorised(tiny_model, items, n_shots=2, cache_root=tmp_path, progress=False)
    assert result.questions == ["q0?", "q3?", "q6?"]
    assert result.per_relation() == {"r0": (3, 3), "r1": (0, 3), "r2": (0, 3)}
    assert [it.question for it in result.filter(items)] == result.questions
    monkeypatch.setattr(memorised_mod, "greedy_generate", None)  # cached: no generation
    again = find_memorised(tiny_model, items, n_shots=2, cache_root=tmp_path, progress=False)
    assert again.questions == result.questions
    folder = tmp_path / "tiny-llama" / "memorised" / dataset_key("builtin", items)
    assert isinstance(MemorisedSet.load(folder), MemorisedSet)


def test_real_generation_runs_on_the_tiny_model(tiny_model):
    result = find_memorised(tiny_model, _items(6), n_shots=1, use_cache=False, progress=False)
    assert len(result.predictions) == 6


def test_conflict_table_markdown():
    table = {
        "r0": {"dss": {"n": 2, "context": 100.0, "memory": 0.0, "neither": 0.0}},
        "all": {"dss": {"n": 2, "context": 100.0, "memory": 0.0, "neither": 0.0}},
    }
    meta = {
        "model": "m",
        "dataset": "d",
        "memorised_shots": 4,
        "n_shots": 3,
        "seed": 0,
        "command": "cmd",
        "seconds": 1.0,
    }
    text = to_markdown(table, {"r0": (1, 2)}, meta)
    assert "| r0 | 2 | 100 / 0 / 0 | – | – |" in text
    assert "| **all** | **1** | **2** | **50 %** |" in text
