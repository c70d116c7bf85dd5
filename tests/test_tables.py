"""One place for tables: spare_tl.viz.tables renders the same typed rows to Markdown and HTML,
with one ``±`` and one layer-range formatter."""

from __future__ import annotations

import math

import pytest

from spare_tl.viz.tables import (
    Table,
    baseline_rows,
    baselines_markdown,
    baselines_table,
    layer_range,
    pm,
    settings_text,
)

ROW = {
    "method": "actadd",
    "EM_C": 61.25,
    "EM_C_std": 2.0,
    "EM_M": 30.0,
    "EM_M_std": 1.5,
    "EM_C->M": {"mean": 3.0, "std": 0.5},
    "EM_M->C": None,
    "extra_forward_passes_per_token": 0,
    "time_relative_to_no_steering": 1.234,
    "inference_time": True,
    "hyperparameters": {"context": {"layers": [12, 13, 14], "coefficient": 2.0}, "memory": {}},
}
ICL = ROW | {"method": "icl", "inference_time": False, "hyperparameters": {}}
PROTOCOL = {"dataset": "builtin", "n_items": 40, "demo_type": "doo", "seeds": [0, 1]}


def test_markdown_and_html_show_the_same_cells_and_alignment():
    table = Table(("name", "value"), [("a<b", 1.5), ("c", 2)], left={0})
    assert table.markdown() == "| name | value |\n|---|---:|\n| a<b | 1.5 |\n| c | 2 |"
    assert table.html() == (
        "<table><tr><th class='left'>name</th><th>value</th></tr>"
        "<tr><td class='left'>a&lt;b</td><td>1.5</td></tr>"
        "<tr><td class='left'>c</td><td>2</td></tr></table>"
    )


def test_a_ragged_row_is_refused():
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        Table(("a", "b"), [(1, 2), (3,)])


def test_plus_minus_and_its_missing_values():
    assert pm(52.66, 4.04) == "52.7 ± 4.0" and pm(0.5, 0.01234, 3) == "0.500 ± 0.012"
    assert pm(3.0) == "3.0" and pm(None, 1.0) == "–" and pm(math.nan, 1.0) == "—"


def test_layer_ranges():
    assert layer_range([12, 13, 14, 15]) == "12-15" and layer_range([7]) == "7"
    assert layer_range([3, 5]) == "[3, 5]" and layer_range(4) == "4"
    assert settings_text(ROW["hyperparameters"]) == "layers 12-14, coefficient 2.0"
    both = {"context": {"alpha": 1.0}, "memory": {"alpha": -1.0}}
    assert settings_text(both) == "alpha 1.0; alpha -1.0"


def test_the_baselines_table_from_rows_in_both_formats():
    table = baselines_table([ROW, ICL])
    assert table.rows[0] == [
        "actadd",
        "61.2 ± 2.0",
        "30.0 ± 1.5",
        "3.0 ± 0.5",
        "–",
        "0",
        "1.23",
        "layers 12-14, coefficient 2.0",
    ]
    assert table.rows[1][0] == "icl *" and table.rows[1][-1] == "–"
    markdown = baselines_markdown({"model": "m", "protocol": PROTOCOL, "rows": [ROW, ICL]})
    assert markdown.startswith(table.markdown() + "\n\nm, builtin dataset: 40 held-out")
    assert "seeds [0, 1]" in markdown
    assert "<td class='left'>icl *</td>" in table.html()


def test_an_old_table_json_with_markdown_is_read_and_the_markdown_ignored():
    old = {"model": "m", "protocol": PROTOCOL, "rows": [ROW], "markdown": "| stale |"}
    rows, protocol = baseline_rows(old)
    assert rows == [ROW] and protocol == PROTOCOL | {"model": "m"}
    assert "stale" not in baselines_markdown(old)
