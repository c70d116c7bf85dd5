"""docs/benchmarks.md is rendered from the benchmark JSON, nothing typed by hand."""

from __future__ import annotations

import json

from spare_tl.cli.docs_benchmarks import benchmarks_document


def test_every_benchmark_file_becomes_a_section_with_its_machine_and_figures(tmp_path):
    (tmp_path / "evaluation.json").write_text(
        json.dumps(
            {
                "machine": "CPU X",
                "date": "2026-12-04",
                "command": "python benchmarks/bench_evaluation.py",
                "conditions": {"ratio": 1.114, "identical": True},
                "target": "a | b",
            }
        )
    )
    (tmp_path / "study.json").write_text(
        json.dumps(
            {
                "machine": "CPU Y",
                "matmul_gflops": 80.0,
                "flops_per_token": 212000000,
                "targets_seconds": {"cad_ratio": 1.3},
                "studies": {
                    "doo_study": {
                        "seconds": 250.0,
                        "target": 300.0,
                        "target_met": True,
                        "flop_limit_seconds": 100.0,
                        "times_flop_limit": 2.5,
                        "what": "doo",
                        "machine": "CPU Y",
                    },
                    "cad_ratio": {"ratio": 1.5, "target": 1.3, "target_met": False},
                },
            }
        )
    )
    page = benchmarks_document(tmp_path)
    assert page.index("## evaluation") < page.index("## study")
    assert (
        "machine: CPU X; date: 2026-12-04; command: python benchmarks/bench_evaluation.py" in page
    )
    assert "| conditions.ratio | 1.114 |" in page and "| target | a \\| b |" in page
    assert "| doo_study | 250 | 300 | yes | 100 | 2.5 | doo |" in page
    assert "| cad_ratio | 1.5 | 1.3 | **no** |" in page
    assert "212,000,000 per token" in page and "80.0 GFLOP/s" in page


def test_an_empty_folder_gives_a_page_without_sections(tmp_path):
    page = benchmarks_document(tmp_path)
    assert page.startswith("# Benchmarks") and "##" not in page
