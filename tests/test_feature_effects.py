"""Per-feature causal effect on a tiny random model: the full set's numbers equal evaluate()'s."""

from __future__ import annotations

import pytest
import torch

from spare_tl.features import FunctionalFeatures, LayerFeatures
from spare_tl.methods.spare import resid_post_hook_name
from spare_tl.stages.evaluation import CONDITION_OF, EvaluationConfig, evaluate
from spare_tl.stages.feature_effects import (
    direction_features,
    feature_effects,
    read_feature_effects,
    restricted,
)
from spare_tl.testing import conflict_items, tiny_sae

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (1, 2)
CONFIG = EvaluationConfig(seeds=(0, 1), n_shots=2, max_new_tokens=3, batch_size=4)
POOL, DEV = conflict_items(8), conflict_items(5, start=200)


def _features() -> FunctionalFeatures:
    layers = {}
    for layer in LAYERS:
        g = torch.Generator().manual_seed(layer)
        ids = torch.randperm(128, generator=g)
        layers[layer] = LayerFeatures(
            layer=layer,
            hook_name=resid_post_hook_name(layer),
            context_features=ids[:2],
            memory_features=ids[2:3],
            context_activations=torch.rand(128, generator=g) * 4,
            memory_activations=torch.rand(128, generator=g) * 4,
        )
    return FunctionalFeatures("tiny-llama", layers, proportion=0.1, edit_strength=3.0)


@pytest.fixture(scope="module")
def setup():
    saes = {layer: tiny_sae(resid_post_hook_name(layer), seed=layer) for layer in LAYERS}
    return _features(), saes


def test_restricted_keeps_only_the_chosen_features(setup):
    features, _ = setup
    fs = direction_features(features, "context")
    assert len(fs) == 6
    one = restricted(features, "context", fs[:1])
    assert list(one.layers) == [fs[0].layer]
    assert one.layers[fs[0].layer].context_features.tolist() == [fs[0].latent]
    assert one.layers[fs[0].layer].memory_features.numel() == 0
    rest = restricted(features, "memory", fs[1:])
    assert sum(a + b for a, b in rest.counts().values()) == 5
    assert rest.strength("memory") == features.strength("memory")


def test_full_set_equals_the_evaluation(tiny_model, setup, tmp_path):
    from spare_tl.cli.docs import _feature_effects_section

    features, saes = setup
    model_dir = tmp_path
    tmp_path = model_dir / "feature_effects"
    effects = feature_effects(
        tiny_model, features, saes, DEV, POOL, config=CONFIG, directory=tmp_path, progress=False
    )
    ref = evaluate(
        tiny_model, DEV, POOL, features=features, saes=saes, config=CONFIG, progress=False
    )
    for d, block in effects.directions.items():
        expected = ref.summary[CONDITION_OF[d]]
        for key in ("EM_C", "EM_M", "neither"):
            assert block["full"][key] == pytest.approx(expected[key])
            assert block["no_steering"][key] == pytest.approx(ref.summary["no_steering"][key])
        rows = block["features"]
        assert len(rows) == 6
        gains = [r["gain"] for r in rows]
        assert gains == sorted(gains, reverse=True)
        assert len(block["top"]) == 3
    # the docs section: one table per direction, rows in the saved order
    text = "\n".join(_feature_effects_section(model_dir, []))
    for d, block in effects.directions.items():
        assert f"### Steering to {d}" in text
        first = block["features"][0]
        assert f"| {first['layer']}:{first['latent']} | {first['role']} |" in text
    assert "5 questions move in steps of 20 points" in text
    # cached: loaded back equal, and a second call does not recompute
    assert read_feature_effects(tmp_path) == effects
    assert (
        feature_effects(
            tiny_model, features, saes, DEV, POOL, config=CONFIG, directory=tmp_path, progress=False
        )
        == effects
    )
