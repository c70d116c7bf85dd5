"""The committed SAEs and functional features steer the embedded model on held-out conflicts.

The features were chosen by the whole-depth development sweep (to context: the residual at
layers 10-13; to memory: the residual at 20-21, where the steerability scan finds the model
steerable). This test pins what they reach on the first 48 held-out (test) questions, seed 0,
doo demonstrations, in both directions, with thresholds below the numbers this test printed
with the committed features in fp32 (2026-12-02), so a change that breaks
the committed features, SAEs or the edit fails here.
"""

from __future__ import annotations

import pytest

from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup

pytestmark = pytest.mark.integration

N_ITEMS = 48


def test_committed_features_steer_held_out_conflicts_both_ways(embedded_model):
    if not (DEFAULT_FEATURES / "features.json").exists() or not DEFAULT_SAES.exists():
        pytest.fail(f"the committed features/SAEs are missing from {DEFAULT_FEATURES.parent}")
    from spare_tl.stages.evaluation import EvaluationConfig, evaluate
    from spare_tl.stages.memorised import memorised_split

    model, features, saes = load_steering_setup(model=embedded_model)
    split = memorised_split(model, features, "builtin", progress=False)
    result = evaluate(
        model,
        split.test[:N_ITEMS],
        split.pool,
        features=features,
        saes=saes,
        config=EvaluationConfig(seeds=(0,)),
        progress=False,
    ).to_json()
    base, to_c, to_m = (result[k] for k in ("no_steering", "steer_to_context", "steer_to_memory"))
    print({k: (result[k]["EM_C"], result[k]["EM_M"], result[k]["neither"]) for k in result
           if k.startswith(("no_", "steer_"))})  # fmt: skip
    # measured in fp32 (seed 0, the first 48 test questions, one demonstration set; the same
    # rows of `spare-tl results`, 2026-12-04): no steering EM_C 56.2 / EM_M 18.8 / neither 25.0;
    # to context 60.4 / 6.2 / 33.3; to memory 25.0 / 33.3 / 41.7
    assert to_c["EM_C"] >= base["EM_C"] + 2, "steering to context lost its context answers"
    assert to_c["EM_M"] <= base["EM_M"] - 8, "steering to context no longer removes memory answers"
    assert to_m["EM_M"] >= base["EM_M"] + 10, "steering to memory lost its memory answers"
    assert to_m["EM_C"] <= base["EM_C"] - 20, "steering to memory no longer removes context"
    assert to_m["neither"] <= base["neither"] + 25, "steering to memory breaks answers"


@pytest.mark.parametrize(("batch_size", "n_items"), [(16, 32), (1, 12)])
def test_shared_prefix_evaluation_gives_the_full_prompt_pass_answers(
    embedded_model, batch_size, n_items
):
    """The shared-prefix harness (the seed's demonstration prefix run once, then one pass of
    each item's own tokens per batch) changes no answer of the embedded model (fp32): the
    same generated text as one full prompt pass per condition, in all three conditions, in
    left-padded batches of 16 and one row at a time."""
    from spare_tl.stages.evaluation import EvaluationConfig, evaluate
    from spare_tl.stages.memorised import memorised_split

    model, features, saes = load_steering_setup(model=embedded_model)
    split = memorised_split(model, features, "builtin", progress=False)
    held_out = split.test[:n_items]
    config = EvaluationConfig(seeds=(0,), batch_size=batch_size)
    runs = [
        evaluate(
            model,
            held_out,
            split.pool,
            features=features,
            saes=saes,
            config=config,
            shared_prefix=shared,
            progress=False,
        )
        for shared in (True, False)
    ]
    shared, full = ([{k: v for k, v in r.items() if k.endswith(".prediction")}
                     for r in run.predictions] for run in runs)  # fmt: skip
    assert shared == full
    conditions = {k for r in shared for k in r}
    assert conditions == {f"{c}.prediction" for c in config.conditions}
