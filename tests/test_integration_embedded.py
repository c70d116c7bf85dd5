"""The committed SAEs and functional features steer the embedded model on held-out conflicts.

The embedded-default issue asks for more than the committed features reach: +10 points of
memory answers steering to memory and >= 85 % context answers steering to context (on this
slice they give +0.0 and 60.0 %; README, Results). This test pins what they do reach, so a
change that breaks the committed features, SAEs or the edit fails here.
"""

from __future__ import annotations

import pytest

from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup

pytestmark = pytest.mark.integration


def test_committed_features_steer_held_out_conflicts_to_context(embedded_model):
    if not (DEFAULT_FEATURES / "features.json").exists() or not DEFAULT_SAES.exists():
        pytest.fail(f"the committed features/SAEs are missing from {DEFAULT_FEATURES.parent}")
    from spare_tl.embedded import memorised_split
    from spare_tl.evaluation import EvaluationConfig, evaluate

    model, features, saes = load_steering_setup(model=embedded_model)
    split = memorised_split(model, features, "builtin", progress=False)
    held_out = split.evaluation[-30:]  # not the slice the README table starts with
    result = evaluate(
        model,
        held_out,
        split.pool,
        features=features,
        saes=saes,
        config=EvaluationConfig(seeds=(0,)),
        progress=False,
    ).to_json()
    base, to_c, to_m = (result[k] for k in ("no_steering", "steer_to_context", "steer_to_memory"))
    print({k: (result[k]["EM_C"], result[k]["EM_M"], result[k]["neither"]) for k in result
           if k.startswith(("no_", "steer_"))})  # fmt: skip
    # measured in this configuration: EM_C 50.0 -> 60.0, EM_M 16.7 -> 6.7 (to context)
    assert to_c["EM_C"] >= base["EM_C"] + 5, "steering to context no longer adds context answers"
    assert to_c["EM_M"] < base["EM_M"], "steering to context no longer removes memory answers"
    # steering to memory: EM_M 16.7 -> 16.7; it must at least not break the answers
    assert to_m["EM_M"] >= base["EM_M"] - 5
    assert to_m["neither"] <= base["neither"] + 10


def test_shared_prefix_evaluation_gives_the_full_prompt_pass_answers(embedded_model):
    """The shared-prefix harness changes no answer of the embedded model (fp32): the same
    generated text as one full prompt pass per condition, in all three conditions."""
    from spare_tl.embedded import memorised_split
    from spare_tl.evaluation import EvaluationConfig, evaluate

    model, features, saes = load_steering_setup(model=embedded_model)
    split = memorised_split(model, features, "builtin", progress=False)
    held_out = split.evaluation[:32]
    config = EvaluationConfig(seeds=(0,))
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
