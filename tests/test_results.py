from __future__ import annotations

import json

from spare_tl.cli.docs import headline, relation_table, results_document, results_table
from spare_tl.stages.evaluation import summarise
from spare_tl.studies.results import reusable


def _result(conditions, labels_by_cond):
    summary = summarise(labels_by_cond, ["r"] * 4, [0, 1])
    return {
        "model": "m",
        "n_items": 4,
        "seeds": [0, 1],
        "features": {"layers": [1], "proportion": 0.1, "edit_strength": 2.0},
        **summary,
    }


def test_table_and_results_document(tmp_path):
    doo = _result(
        None,
        {
            "no_steering": {0: ["context"] * 4, 1: ["context", "context", "memory", "neither"]},
            "steer_to_context": {0: ["context"] * 4, 1: ["context"] * 4},
            "steer_to_memory": {0: ["memory"] * 2 + ["context"] * 2, 1: ["memory"] * 4},
        },
    )
    table = results_table({"doo": doo})
    ci_c = doo["no_steering"]["intervals"]["EM_C"]["ci95"]
    ci_m = doo["steer_to_memory"]["intervals"]["EM_M"]["ci95"]
    ci_mc = doo["steer_to_memory"]["intervals"]["EM_C"]["ci95"]
    test = doo["steer_to_memory"]["intervals"]["EM_M"]["vs_no_steering"]["paired_bootstrap"]
    assert (
        f"| doo | steer to memory | 25.0 ± 25.0 [{ci_mc['low']:.1f}, {ci_mc['high']:.1f}] | "
        f"75.0 ± 25.0 [{ci_m['low']:.1f}, "
        f"{ci_m['high']:.1f}] | 0.0 | +62.5 [{test['low']:+.1f}, {test['high']:+.1f}], "
        f"p = {test['p_value']:.2g} |" in table
    )
    assert f"| doo | no steering | 75.0 ± 25.0 [{ci_c['low']:.1f}, {ci_c['high']:.1f}]" in table
    assert "EM_C->M" in table
    assert "| r | 4 | 75.0 / 12.5 | 100.0 / 0.0 | 25.0 / 75.0 |" in relation_table(doo)
    results = tmp_path / "m" / "results"
    results.mkdir(parents=True)
    (results / "doo.json").write_text(json.dumps(doo | {"demo_type": "doo"}))
    text, missing = results_document(tmp_path / "m")
    assert table in text and "## Not available" in text
    assert any("steerability scan" in m for m in missing)
    assert any("baselines" in m for m in missing)
    line = headline(tmp_path / "m")
    assert line is not None and "EM_M 12.5 % [" in line and "4 held-out questions × 2 seeds" in line


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


def test_sweep_section_names_the_dtype_or_says_it_is_unrecorded(tmp_path):
    from spare_tl.cli.docs import _sweep_section
    from spare_tl.stages.sweep import save_sweep

    none = {"direction": "none", "layers": [], "n": 4, "EM_C": 50.0, "EM_M": 25.0, "neither": 25.0}
    save_sweep([none], tmp_path / "a", {"dtype": "torch.float32"})
    save_sweep([none], tmp_path / "b", {})
    assert "Model weights in float32." in "\n".join(
        _sweep_section(tmp_path / "a" / "sweep.json", [])
    )
    old = "\n".join(_sweep_section(tmp_path / "b" / "sweep.json", []))
    assert "dtype is not recorded in sweep.json" in old
