"""The visualisation layer's shape: the report command loads lightly, and the report's tables
come from typed data, not Markdown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spare_tl.studies import saved as saved_studies
from spare_tl.studies.probes import LayerProbeScores, ProbeResults
from spare_tl.viz import (
    report_page,
    report_tables,
)


def test_the_report_command_is_registered_from_viz_and_loads_lightly():
    from spare_tl.cli import REGISTRARS

    assert "spare_tl.cli.report:register" in REGISTRARS
    assert "spare_tl.report:register" not in REGISTRARS
    code = "import sys, spare_tl.cli.report; print('plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------
# The report's studies come from typed data
# --------------------------------------------------------------------------------------

ROWS = [
    {
        "method": "none",
        "EM_C": 55.0,
        "EM_C_std": 5.5,
        "EM_M": 15.8,
        "EM_M_std": 4.9,
        "EM_C->M": None,
        "EM_M->C": None,
        "extra_forward_passes_per_token": 0.0,
        "time_relative_to_no_steering": 1.0,
        "inference_time": True,
        "hyperparameters": {},
    },
    {
        "method": "icl",
        "EM_C": 62.54,
        "EM_C_std": 3.71,
        "EM_M": 34.16,
        "EM_M_std": 6.08,
        "EM_C->M": {"mean": 10.2, "std": 7.4},
        "EM_M->C": {"mean": 45.3, "std": 15.3},
        "extra_forward_passes_per_token": 0.0,
        "time_relative_to_no_steering": 0.8412,
        "inference_time": False,
        "hyperparameters": {"context": {"demo_type": "dss"}, "memory": {"demo_type": "dso"}},
    },
    {
        "method": "spare",
        "EM_C": 68.33,
        "EM_C_std": 6.24,
        "EM_M": 16.67,
        "EM_M_std": 4.56,
        "EM_C->M": {"mean": 0.0, "std": 0.0},
        "EM_M->C": {"mean": 43.33, "std": 23.48},
        "extra_forward_passes_per_token": 0.0,
        "time_relative_to_no_steering": 0.936,
        "inference_time": True,
        "hyperparameters": {
            "context": {"layers": [12, 13, 14, 15], "proportion": 0.2},
            "memory": {"layers": [10], "edit_strength": 2.0},
        },
    },
]
TABLE = {
    "model": "tiny-llama",
    "protocol": {"n_items": 24, "seeds": [0, 1], "demo_type": "doo", "dataset": "builtin"},
    "rows": ROWS,
    "markdown": "| MARKDOWN-SENTINEL | x |\n|---|---|\nSENTINEL-PARAGRAPH",
}


def _probe_results() -> ProbeResults:
    scores = {
        k: LayerProbeScores(k, [0.6 + 0.1 * k, 0.62], [0.7 + 0.05 * k, 0.7], [0.1, 0.3], [4, 6])
        for k in (1, 2)
    }
    config = {"n_questions": 12, "n_prompts": 24, "test_fraction": 0.25, "seeds": [0, 1]}
    return ProbeResults("resid", "tiny-llama", scores, config=config | {"Cs": [0.1, 1.0]})


def _section(page: str, start: str, end: str | None = None) -> str:
    return page[page.index(start) : page.index(end) if end else len(page)]


def test_report_sections_are_built_from_typed_data_without_markdown(monkeypatch):
    import spare_tl.cli.probes
    from spare_tl.viz import tables

    def no_markdown(*args, **kwargs):
        raise AssertionError("the report must not write (and parse back) Markdown")

    monkeypatch.setattr(tables.Table, "markdown", no_markdown)
    monkeypatch.setattr(spare_tl.cli.probes, "probes_table", no_markdown)
    for module in (report_page, report_tables):
        assert not hasattr(module, "_markdown_table") and not hasattr(module, "_markdown_html")

    resid = _probe_results()
    study = saved_studies.SavedProbeStudy(resid=resid)
    page = report_page.build_report(baselines=TABLE, probes=study)
    base = _section(page, "<h2>Baselines</h2>", "<h2>Functional features</h2>")
    for row in ROWS:
        assert f"{row['EM_C']:.1f} ± {row['EM_C_std']:.1f}" in base
        assert f"{row['EM_M']:.1f} ± {row['EM_M_std']:.1f}" in base
        assert f"<td>{row['time_relative_to_no_steering']:.2f}</td>" in base
    assert "<td class='left'>icl *</td>" in base and "<td>45.3 ± 15.3</td>" in base
    assert (
        "<td class='left'>layers 12-15, proportion 0.2; layers 10, edit_strength 2.0</td>" in base
    )
    assert "tiny-llama, builtin dataset: 24 held-out memorised questions" in base
    assert "SENTINEL" not in page and "|---" not in base

    probes = _section(page, "<h2>Detecting the conflict</h2>")
    best = resid.layers[2]
    assert "<td>2 (best residual)</td>" in probes
    assert f"<td>{best.auroc_mean:.3f} ± {best.auroc_std:.3f}</td>" in probes
    assert "<code>sub_context</code>" in probes and "No conditional steering results" in probes


def test_load_probe_study_is_typed_and_notes_what_is_missing(tmp_path):
    notes: list[str] = []
    assert saved_studies.load_probe_study(tmp_path / "none", notes) is None
    assert notes and notes[0].startswith("probes (detecting the conflict): none in")
    resid = _probe_results()
    resid.save(tmp_path / "probes" / "resid" / "results.json")
    notes = []
    study = saved_studies.load_probe_study(tmp_path / "probes", notes)
    assert isinstance(study, saved_studies.SavedProbeStudy)
    assert isinstance(study.resid, ProbeResults) and study.resid.to_json() == resid.to_json()
    assert study.sae is None and study.probe is None and study.conditional is None
    assert [n.split(" in ")[0] for n in notes] == [
        "probes: no sae/results.json",
        "probes: no latents.json",
        "probes: no conditional/results.json",
    ]
    assert saved_studies.load_probe_study(tmp_path / "probes") is not None  # notes optional


@pytest.mark.parametrize("broken", ["{", '{"rows": 3}'])
def test_load_baselines_notes_an_unreadable_table(tmp_path, broken):
    (tmp_path / "table.json").write_text(broken)
    notes: list[str] = []
    assert saved_studies.load_baselines(tmp_path, notes) is None
    assert notes[0].startswith(f"baselines: cannot read {tmp_path}")
