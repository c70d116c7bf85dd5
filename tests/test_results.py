from __future__ import annotations

import json

from spare_tl.evaluation import summarise
from spare_tl.results import END, START, results_table, reusable, update_readme


def _result(conditions, labels_by_cond):
    summary = summarise(labels_by_cond, ["r"] * 4, [0, 1])
    return {
        "model": "m",
        "n_items": 4,
        "seeds": [0, 1],
        "features": {"layers": [1], "proportion": 0.1, "edit_strength": 2.0},
        **summary,
    }


def test_table_and_readme_block(tmp_path):
    doo = _result(
        None,
        {
            "no_steering": {0: ["context"] * 4, 1: ["context", "context", "memory", "neither"]},
            "steer_to_context": {0: ["context"] * 4, 1: ["context"] * 4},
            "steer_to_memory": {0: ["memory"] * 2 + ["context"] * 2, 1: ["memory"] * 4},
        },
    )
    table = results_table({"doo": doo})
    assert "| doo | steer to memory | 25.0 ± 25.0 | 75.0 ± 25.0 | 0.0 |" in table
    assert "| doo | no steering | 75.0 ± 25.0 | 12.5 ± 12.5 | 12.5 |" in table
    assert "EM_C->M" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nold\n{END}\n\nafter\n")
    update_readme(table, readme)
    text = readme.read_text()
    assert "old" not in text and "after" in text and text.count(START) == 1


def test_saved_results_are_reused_only_for_the_same_features_questions_and_seeds(tmp_path):
    labels = {
        c: {0: ["context"] * 4, 1: ["memory"] * 4} for c in ("no_steering", "steer_to_memory")
    }
    saved = {**_result(None, labels), "demo_type": "dss"}
    path = tmp_path / "dss.json"
    path.write_text(json.dumps(saved))
    questions = [f"q{i}?" for i in range(4)]
    records = [{"seed": s, "question": q} for s in (0, 1) for q in questions]
    (tmp_path / "dss-predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # saved before latent codes existed: made with the SAE's own encode
    features = {**saved["features"], "latent_code": "encode"}
    assert reusable(path, features, questions, [0, 1], "dss") == saved
    assert reusable(tmp_path / "missing.json", features, questions, [0, 1], "dss") is None
    assert reusable(path, {**features, "latent_code": "relu_pre"}, questions, [0, 1], "dss") is None
    assert reusable(path, features, questions[::-1], [0, 1], "dss") is None  # other order
    assert reusable(path, features, questions[:3] + ["other?"], [0, 1], "dss") is None
    assert reusable(path, features, questions, [0, 1, 2], "dss") is None
    assert reusable(path, features, questions, [0, 1], "doo") is None  # needs steer_to_context
    (tmp_path / "dss-predictions.jsonl").unlink()
    assert reusable(path, features, questions, [0, 1], "dss") is None
