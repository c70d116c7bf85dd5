"""The steerability scan (spare_tl.stages.scan) on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from spare_tl.data.prompts import conflict_prompt
from spare_tl.generation import _tokenize
from spare_tl.stages.activations import last_position_activations
from spare_tl.stages.evaluation import development_items, evaluation_demonstrations
from spare_tl.stages.harness import Condition, NoSteering, answer_prompts
from spare_tl.stages.scan import (
    DonorPatch,
    ScanConfig,
    ScanResult,
    cached_scan,
    donor_prompts,
    scan_table,
    site_hook_name,
    steerability_scan,
)
from spare_tl.testing import conflict_items

pytestmark = pytest.mark.usefixtures("one_thread")


_items = conflict_items


POOL, DEV = _items(6), _items(5, start=50)
CONFIG = ScanConfig(layers=(0, 2), max_new_tokens=3, batch_size=2)


def test_scan_rows_cover_every_site_layer_and_direction(tiny_model):
    result = steerability_scan(tiny_model, DEV, POOL, CONFIG, progress=False)
    assert len(result.rows) == 2 * 3 * 2
    assert {(r["site"], r["layer"], r["direction"]) for r in result.rows} == {
        (s, layer, d) for s in CONFIG.sites for layer in (0, 2) for d in ("memory", "context")
    }
    for r in result.rows + [result.baseline, *result.donors.values()]:
        assert abs(r["EM_C"] + r["EM_M"] + r["neither"] - 100) < 1e-6
    assert result.n_items == len(DEV) and result.config["layers"] == [0, 2]
    assert "no patch" in scan_table(result)


def test_patching_a_run_with_its_own_activation_changes_nothing(tiny_model):
    demos = evaluation_demonstrations(DEV, POOL, 3, 0)
    prompts = [conflict_prompt(it, d, "doo") for it, d in zip(DEV, demos)]
    hooks = [site_hook_name(1, s) for s in ("resid_post", "attn_out", "mlp_out")]
    own = last_position_activations(tiny_model, prompts, hooks, progress=False)
    conds = [Condition("none", NoSteering())] + [
        Condition(h, DonorPatch(h, own[h]), "memory") for h in hooks
    ]
    out = answer_prompts(tiny_model, prompts, conds, max_new_tokens=4, batch_size=2, progress=False)
    assert all(out[h] == out["none"] for h in hooks)


def test_patching_the_last_residual_gives_the_donor_first_token(tiny_model):
    """At the last layer's residual the patched row's next token is the donor's own."""
    demos = evaluation_demonstrations(DEV, POOL, 3, 0)
    prompts = [conflict_prompt(it, d, "doo") for it, d in zip(DEV, demos)]
    donors = donor_prompts(DEV, demos)["memory"]
    last = site_hook_name(tiny_model.cfg.n_layers - 1, "resid_post")
    acts = last_position_activations(tiny_model, donors, [last], progress=False)[last]
    tokens = _tokenize(tiny_model, donors)
    donor_first = []
    for ids in tokens:
        logits = tiny_model(torch.tensor([ids]))
        donor_first.append(int(logits[0, -1].argmax()))
    first = []
    for i, p in enumerate(prompts):
        ids = torch.tensor(_tokenize(tiny_model, [p]))

        def hook(x, hook, i=i):
            x = x.clone()
            x[:, -1] = acts[i]
            return x

        with tiny_model.hooks(fwd_hooks=[(last, hook)]):
            first.append(int(tiny_model(ids)[0, -1].argmax()))
    assert first == donor_first
    # and the harness's patch gives the same first tokens
    out = answer_prompts(
        tiny_model,
        prompts,
        [Condition("patch", DonorPatch(last, acts), "memory")],
        max_new_tokens=1,
        batch_size=2,
        progress=False,
    )["patch"]
    decoded = [tiny_model.tokenizer.decode([t], skip_special_tokens=True) for t in donor_first]
    assert out == [d.split("\n")[0].strip() for d in decoded]


def test_row_patches_need_the_shared_prefix(tiny_model):
    patch = DonorPatch("blocks.0.hook_resid_post", torch.zeros(1, tiny_model.cfg.d_model))
    with pytest.raises(ValueError, match="shared prefix"):
        answer_prompts(tiny_model, ["x"], [Condition("p", patch, "memory")], shared_prefix=False)


def test_scan_is_cached_and_recomputed_on_new_questions(tiny_model, tmp_path, monkeypatch):
    first = cached_scan(tiny_model, DEV, POOL, CONFIG, root=tmp_path, progress=False)
    import spare_tl.stages.scan as scan_module

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(scan_module, "steerability_scan", boom)
    again = cached_scan(tiny_model, DEV, POOL, CONFIG, root=tmp_path, progress=False)
    assert again.to_json() == first.to_json()
    with pytest.raises(AssertionError, match="recomputed"):
        cached_scan(tiny_model, DEV[:3], POOL, CONFIG, root=tmp_path, progress=False)


def test_effect_oracle_and_the_steerable_layer_rule():
    rows = [
        {"direction": "memory", "site": "resid_post", "layer": layer, "EM_C": 0.0, "EM_M": m,
         "neither": 100.0 - m}
        for layer, m in [(0, 10.0), (1, 12.0), (2, 40.0), (3, 70.0)]
    ]  # fmt: skip
    scan = ScanResult("m", 10, {"EM_C": 50.0, "EM_M": 10.0, "neither": 40.0}, {}, rows)
    assert scan.effect("memory") == {0: 0.0, 1: 2.0, 2: 30.0, 3: 60.0}
    assert scan.steerable_layers("memory") == [2, 3]  # >= 30 points, half of the best 60
    assert scan.steerable_layers("memory", share=0.9) == [3]
    assert scan.oracle("memory", [0, 1, 2]) == 40.0
    assert scan.steerable_layers("context") == []
    with pytest.raises(ValueError, match="no resid_post patch"):
        scan.oracle("memory", [7])
    assert ScanResult.from_json(scan.to_json()) == scan


def test_config_and_development_items_are_checked():
    with pytest.raises(ValueError, match="sites"):
        ScanConfig(sites=("resid_pre",))
    with pytest.raises(ValueError, match="directions"):
        ScanConfig(directions=("up",))
    items = _items(10)
    assert development_items(items, 4) == items[:4]
    with pytest.raises(ValueError, match="ask for fewer"):
        development_items(items, 11)
    with pytest.raises(ValueError, match="at least 1"):
        development_items(items, 0)


def test_scan_figure(tiny_model):
    from spare_tl.viz import steerability_scan as figure

    result = steerability_scan(tiny_model, DEV[:2], POOL, CONFIG, progress=False)
    fig = figure(result, highlight_layers=[2])
    names = [t.name for t in fig.data]
    assert "memory donor → EM_M, residual" in names and "context donor → EM_C, MLP out" in names
    assert all(len(t.x) == 2 for t in fig.data)
    with pytest.raises(ValueError, match="no rows"):
        figure({"rows": [], "baseline": {}})


def test_cli_scan_arguments():
    from spare_tl.cli import build_parser

    args = build_parser().parse_args(["scan", "c.toml", "--layers", "0-3", "--sites", "attn_out"])
    assert args.layers == ["0-3"] and args.sites == ["attn_out"] and args.n_items == 128


def test_report_draws_the_scan_beside_the_mutual_information(tiny_model):
    from spare_tl.viz import build_report

    result = steerability_scan(tiny_model, DEV[:2], POOL, CONFIG, progress=False)
    page = build_report(scan=result)
    assert "Where the model can be steered" in page and "memory donor" in page
    assert "Where the model can be steered" not in build_report()


def test_donor_activations_from_the_shared_prefix_equal_full_passes(tiny_model):
    """One demonstration set: the prefix runs once and every batch continues from its KV
    cache, stopping early; the activations are the full passes' (every site, odd batches)."""
    from spare_tl.generation import PromptPrefix

    demos = evaluation_demonstrations(DEV, POOL, 3, 0)
    donors = donor_prompts(DEV, demos)["memory"]
    assert PromptPrefix.of(tiny_model, _tokenize(tiny_model, donors)).length > 0
    hooks = [site_hook_name(1, s) for s in ("resid_post", "attn_out", "mlp_out")]
    once = last_position_activations(tiny_model, donors, hooks, batch_size=3, progress=False)
    full = last_position_activations(
        tiny_model, donors, hooks, batch_size=3, progress=False, shared_demonstrations=False
    )
    for h in hooks:
        torch.testing.assert_close(once[h], full[h], atol=1e-4, rtol=1e-4)
