"""The whole SpARE pipeline end to end on the embedded SmolLM2 with small random SAEs."""

from __future__ import annotations

import pytest

from spare_tl.data.datasets import load_dataset
from spare_tl.data.schema import write_conflict_jsonl
from spare_tl.features import FunctionalFeatures
from spare_tl.stages.behaviours import BehaviourConfig
from spare_tl.stages.evaluation import EvaluationConfig
from spare_tl.stages.pipeline import PipelineConfig, run_pipeline
from spare_tl.testing import tiny_sae

pytestmark = pytest.mark.integration


def test_pipeline_end_to_end_on_the_embedded_model(embedded_model, tmp_path):
    items = [
        it
        for it in load_dataset("builtin")
        if it.relation in ("country_capital", "us_state_capital", "element_symbol")
    ][::3]
    data = tmp_path / "subset.jsonl"
    write_conflict_jsonl(items, data)
    saes = {
        layer: tiny_sae(
            f"blocks.{layer}.hook_resid_post",
            d_in=576,
            d_sae=1152,
            k=32,
            seed=layer,
            model_name="smollm2-135m-instruct",
        )
        for layer in (10, 12)
    }
    config = PipelineConfig(
        dataset=str(data),
        layers=[10, 12],
        pool_size=16,
        behaviours=BehaviourConfig(shots=(2,), seeds=(0,), demo_types=("dss", "dso")),
        to_context={"proportion": 0.1, "edit_strength": 2.0},
        evaluation=EvaluationConfig(seeds=(0,), n_shots=2),
        n_eval_items=8,
        cache_root=str(tmp_path / "cache"),
        features_dir=str(tmp_path / "features"),
    )
    result = run_pipeline(config, model=embedded_model, saes=saes, progress=False)
    assert len(result.memorised.questions) >= 20  # it knows capitals and symbols
    counts = result.grouped.counts()
    assert counts["context"] > 0 and counts["memory"] > 0  # dss vs dso elicit both
    for layer in (10, 12):
        assert result.activations.resid[layer].shape[1] == 576
        assert result.statistics[layer].mutual_information.shape == (1152,)
    loaded = FunctionalFeatures.load(tmp_path / "features")
    assert loaded.counts() == result.features.counts()
    assert sum(c + m for c, m in loaded.counts().values()) > 0
    summary = result.evaluation.to_json()
    assert summary["n_items"] == 8
    for cond in ("no_steering", "steer_to_context", "steer_to_memory"):
        assert 0 <= summary[cond]["EM_C"] <= 100 and 0 <= summary[cond]["EM_M"] <= 100
    # the unchanged config skips every stage the second time
    again = run_pipeline(config, model=embedded_model, saes=saes, until="features", progress=False)
    assert again.grouped.records == result.grouped.records
