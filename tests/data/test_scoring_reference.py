"""Re-score the SpARE paper's own grouped prompts and agree with its recorded exact match.

The reference is the paper's published ``cache_data`` (read from
``<repo>/../shared/reference/spare-original-cache``, never copied into the repo): for
Meta-Llama-3-8B on NQ-Swap, 15 files (3/4/5 shots x 5 seeds) of greedy answers under
knowledge conflict with the recorded ``sub_answer_em`` and ``org_answer_em``. The recorded
``pred_answer`` is already cut at the first newline and stripped, so it is scored as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spare_tl.data.scoring import clean_prediction, exact_match

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared/reference/spare-original-cache"
GROUPED = REFERENCE / "Meta-Llama-3-8B" / "grouped_prompts"

pytestmark = pytest.mark.skipif(
    not GROUPED.is_dir(),
    reason=f"SpARE reference cache not found at {GROUPED} (it lives outside the repo)",
)


def test_rescored_exact_match_agrees_with_recorded() -> None:
    files = sorted(GROUPED.glob("*shot-seed*-results.json"))
    assert len(files) == 15, [f.name for f in files]
    records = agree = 0
    disagreements: list[str] = []
    for path in files:
        for r in json.loads(path.read_text(encoding="utf-8")):
            records += 1
            pred = r["pred_answer"]
            assert pred == clean_prediction(pred)  # already post-processed upstream
            sub = int(exact_match(pred, r["sub_answer"]))
            org = int(exact_match(pred, r["org_answer"]))
            if (sub, org) == (r["sub_answer_em"], r["org_answer_em"]):
                agree += 1
            else:
                disagreements.append(
                    f"{path.name}: {pred!r} C={r['sub_answer']} M={r['org_answer']} "
                    f"recorded=({r['sub_answer_em']},{r['org_answer_em']}) ours=({sub},{org})"
                )
    rate = agree / records
    print(f"\nexact-match agreement: {agree}/{records} records = {100 * rate:.3f} %")
    for line in disagreements[:20]:
        print("  " + line)
    assert records == 16335
    assert rate >= 0.995, disagreements[:20]
