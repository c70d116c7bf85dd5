from __future__ import annotations

import json

import pytest

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
        f"{ci_m['high']:.1f}] | 0.0 | – | +62.5 [{test['low']:+.1f}, {test['high']:+.1f}], "
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
    # saved before the protocol was recorded: demonstrations drawn per item
    assert reusable(path, features, questions, [0, 1], "dss", "per_item") == saved
    assert reusable(path, features, questions, [0, 1], "dss") is None  # per seed: another run
    saved["protocol"] = {"demonstrations": "per_seed"}
    path.write_text(json.dumps(saved))
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


def _saved_scan(root):
    from spare_tl.stages.scan import ScanResult

    rows = [
        {"direction": d, "site": "resid_post", "layer": layer}
        | {"EM_C": 10.0, "EM_M": 10.0 * layer, "neither": 0.0}
        for d in ("memory", "context")
        for layer in range(3)
    ]
    scan = ScanResult(
        model_name="m",
        n_items=4,
        baseline={"EM_C": 50.0, "EM_M": 25.0, "neither": 25.0},
        donors={"memory": {"EM_C": 0.0, "EM_M": 75.0, "neither": 25.0}},
        rows=rows,
        config={"sites": ["resid_post"]},
    )
    scan.save(root / "m" / "scan", {"stage": "scan", "dtype": "torch.float32", "items": "q"})


def test_docs_redraws_the_scan_picture_or_says_why_not(tmp_path, monkeypatch):
    from spare_tl.cli import docs
    from spare_tl.viz import browser

    monkeypatch.setenv("SPARE_TL_CACHE", str(tmp_path))
    png = tmp_path / "img" / "scan.png"
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    assert "no headless Chromium" in docs.draw_scan_figure("m", png) and not png.exists()
    monkeypatch.setattr(browser, "find_chromium", lambda: "/bin/true")
    assert "no saved steerability scan" in docs.draw_scan_figure("m", png)
    _saved_scan(tmp_path)
    drawn: list[str] = []

    def fake_screenshot(html, path):  # what Chromium does: render the page to a .png
        assert "plotly" in html.read_text() and path.suffix == ".png"
        drawn.append(str(path))
        path.write_bytes(b"\x89PNG fake")
        return path

    monkeypatch.setattr(browser, "screenshot", fake_screenshot)
    assert docs.draw_scan_figure("m", png) == f"redrew {png}"
    assert png.read_bytes() == b"\x89PNG fake" and drawn and drawn[0] != str(png)
    assert not list(png.parent.glob(".*tmp"))  # written beside, then renamed
    text = docs.results_document(tmp_path / "m")[0]
    assert "Model weights in float32." in text


def test_screenshot_refuses_a_path_chromium_would_not_write_and_an_empty_result(tmp_path):
    from spare_tl.viz.browser import screenshot

    html = tmp_path / "page.html"
    html.write_text("<p>hi</p>")
    with pytest.raises(ValueError, match="only to a .png path"):
        screenshot(html, tmp_path / "shot.png.tmp", chromium="/bin/true")
    with pytest.raises(RuntimeError, match="without writing"):
        screenshot(html, tmp_path / "shot.png", chromium="/bin/true")  # exits 0, draws nothing


def test_sweep_oracle_follows_the_saved_scan_of_the_same_questions(tmp_path):
    from spare_tl.cli.docs import _sweep_section
    from spare_tl.stages.sweep import save_sweep

    _saved_scan(tmp_path)  # memory donor: EM_M 0, 10, 20 at layers 0-2 (no patch 25)
    rec = {"n": 4, "EM_C": 10.0, "neither": 0.0, "site": "resid_post", "proportion": 0.1}
    records = [
        rec | {"direction": "none", "layers": [], "EM_M": 25.0, "edit_strength": 0.0},
        rec | {"direction": "memory", "layers": [1, 2], "EM_M": 50.0, "edit_strength": 2.0},
    ]
    stale = {"memory": {"oracle_EM": 99.0, "oracle_gain": 74.0, "spare_gain": 25.0, "share": 0.3}}
    sweep = tmp_path / "m" / "sweep"
    save_sweep(records, sweep, {"items": "q"}, stale)
    text = "\n".join(_sweep_section(sweep / "sweep.json", []))
    assert "reaches EM_M 20.0 (-5.0)" in text and "99.0" not in text  # the saved scan's
    save_sweep(records, sweep, {"items": "other questions"}, stale)
    assert "reaches EM_M 99.0" in "\n".join(_sweep_section(sweep / "sweep.json", []))


def test_the_protocol_and_the_contains_counts_are_shown(tmp_path):
    from spare_tl.cli.docs import protocol_comparison, protocol_text

    labels = {
        "no_steering": {0: ["context"] * 4, 1: ["memory"] * 4},
        "steer_to_memory": {0: ["memory"] * 4, 1: ["memory"] * 4},
    }
    dss = {**_result(None, labels), "demo_type": "dss"}
    dss["steer_to_memory"].update(contains_C=0.0, contains_M=100.0)
    dss["relations"] = {"a": 3, "b": 1}
    dss["protocol"] = {"demonstrations": "per_seed"}
    table = results_table({"dss": dss})
    assert "| 0.0 / 100.0 |" in table and "| – |" in table  # no_steering saved no counts
    assert "one set of pool demonstrations per seed" in table and "2 relations (a 3, b 1)" in table
    old = {**dss, "protocol": {}}
    assert "recorded before the protocol was" in protocol_text(old)
    per_item = {**dss}
    per_item["steer_to_memory"] = {**dss["steer_to_memory"], "EM_M": 50.0, "EM_M_std": 10.0}
    compared = protocol_comparison({"dss": dss}, {"dss-per_item": per_item})
    assert "| dss | steer to memory | EM_M | 100.0 ± 0.0 | 50.0 ± 10.0 |" in compared
    assert "| dss | no steering | EM_M | 50.0 ± 50.0 |" in compared
