"""SAE training (SAELens multi-SAE runner) on a tiny model, and the held-out metrics."""

from __future__ import annotations

import math
import re

import pytest
import torch

from spare_tl.cli.train_saes import format_metrics_table
from spare_tl.data.schema import ConflictItem
from spare_tl.saes import load_sae, validate_sae
from spare_tl.stages.train_saes import (
    METRICS_FILE,
    SAETrainingConfig,
    _runner_config,
    activation_moments,
    evaluate_saes,
    initial_training_saes,
    load_metrics,
    pack_prompt_aligned,
    prompt_texts,
    reconstruction_metrics,
    split_items,
    train_saes,
)
from spare_tl.testing import tiny_model

CITIES = ["Paris", "Tokyo", "Rome", "Cairo", "Lima", "Oslo", "Kyiv", "Quito", "Seoul", "Doha"]
COUNTRIES = ["France", "Japan", "Italy", "Egypt", "Peru", "Norway", "Ukraine", "Ecuador"]


def _items(n: int = 24) -> list[ConflictItem]:
    out = []
    for i in range(n):
        country = f"{COUNTRIES[i % len(COUNTRIES)]}{i}"
        org, sub = CITIES[i % len(CITIES)], CITIES[(i + 3) % len(CITIES)]
        out.append(
            ConflictItem(
                question=f"What is the capital of {country}?",
                org_context=f"The capital of {country} is {org}.",
                org_answer=(org,),
                sub_context=f"The capital of {country} is {sub}.",
                sub_answer=(sub,),
                relation="capital_of",
            )
        )
    return out


def _identity_topk_sae(d: int):
    """A TopK SAE with W_enc = [I, -I]: exactly one of each pair fires, so x_hat == x."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_split_items_is_disjoint_and_seeded():
    items = _items(40)
    train, held = split_items(items, 0.25, seed=3)
    assert {i.question for i in train}.isdisjoint({i.question for i in held})
    assert len(train) + len(held) == 40 and len(held) == 10
    assert split_items(items, 0.25, seed=3) == (train, held)


def test_prompt_stream_and_packing():
    items = _items(12)
    stream = prompt_texts(items, seed=0)
    texts = [next(stream) for _ in range(30)]
    assert texts == [t for _, t in zip(range(30), prompt_texts(items, seed=0))]
    kinds = {k for k, _ in texts}
    assert kinds <= {"dss", "dso", "doo", "closed"} and len(kinds) >= 3
    assert all(t.endswith("\n\n") and "answer:" in t for _, t in texts)
    rows = pack_prompt_aligned(iter([[1] * 5, [2] * 4, [3] * 7, [4] * 2]), 8, 10)
    assert rows == [[1] * 5 + [2] * 3, [3] * 7 + [4]]


def test_identity_sae_metrics():
    torch.manual_seed(0)
    x = torch.randn(500, 8) * 3 + 1
    m = reconstruction_metrics(_identity_topk_sae(8), x)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["mean_l0"] == pytest.approx(8.0)
    assert m["dead_fraction"] == 0.0

    from sae_lens import TopKSAE, TopKSAEConfig

    mean_only = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
    with torch.no_grad():
        for p in (mean_only.W_enc, mean_only.W_dec, mean_only.b_enc):
            p.zero_()
        mean_only.b_dec.copy_(x.mean(0))
    m0 = reconstruction_metrics(mean_only, x)
    assert m0["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert m0["dead_fraction"] == 1.0


def test_identity_sae_splice_leaves_loss_unchanged():
    model = tiny_model()
    sae = _identity_topk_sae(model.cfg.d_model)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    seqs = [list(range(3, 3 + n)) for n in (9, 17, 30)]
    res = evaluate_saes(model, {1: sae}, seqs, batch_size=2, progress=False)[1]
    assert res["ce_increase"] == pytest.approx(0.0, abs=1e-4)
    assert res["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert res["n_tokens"] == sum(len(s) - 1 for s in seqs)
    # padding does not change the clean loss: batched == one sequence at a time
    one = [evaluate_saes(model, {1: sae}, [s], progress=False)[1] for s in seqs]
    n = [len(s) - 1 for s in seqs]
    per_seq = sum(r["ce_clean"] * k for r, k in zip(one, n)) / sum(n)
    assert res["ce_clean"] == pytest.approx(per_seq, rel=1e-5)


def test_tiny_training_run_writes_loadable_saes(tmp_path):
    model = tiny_model()
    cfg = SAETrainingConfig(
        layers=(1, 2),
        d_sae=64,
        k=4,
        training_tokens=2048,
        context_size=64,
        train_batch_size_tokens=256,
        store_batch_size_prompts=4,
        n_batches_in_buffer=8,
        dead_feature_window=4,
        n_batches_for_norm_estimate=2,
        lr=3e-3,
        heldout_fraction=0.25,
        heldout_prompts=6,
        ce_prompts=3,
    )
    out = tmp_path / "saes"
    record = train_saes(model, _items(24), cfg, out, progress=False)
    assert set(record["layers"]) == {"1", "2"}
    for layer in (1, 2):
        folder = out / f"blocks.{layer}.hook_resid_post"
        assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
        sae = load_sae(folder)
        validate_sae(model, sae, layer)
        assert sae.W_enc.dtype == torch.float32  # stored as float16, loads as float32
        assert sae.cfg.metadata.model_name == model.cfg.model_name
        m = record["layers"][str(layer)]
        assert m["d_sae"] == 64 and m["k"] == 4
        assert 0 < m["mean_l0"] <= 4
        assert math.isfinite(m["explained_variance"]) and math.isfinite(m["ce_increase"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir removed
    stored = load_metrics(out)
    assert stored == record and (out / METRICS_FILE).exists()
    run = next(iter(stored["runs"].values()))
    assert run["config"]["layers"] == [1, 2] and run["wall_time_s"] > 0
    table = format_metrics_table(stored)
    assert "dead %" in table and re.search(r"\n +1 ", table)

    # retraining one layer keeps the other layer's entry
    cfg.layers = (2,)
    record2 = train_saes(model, _items(24), cfg, out, progress=False)
    assert set(record2["layers"]) == {"1", "2"} and len(record2["runs"]) == 2

    # an attention-output SAE at layer 2 sits beside the residual one, under its own key
    cfg.site = "attn_out"
    record3 = train_saes(model, _items(24), cfg, out, progress=False)
    assert set(record3["layers"]) == {"1", "2", "2.attn_out"}
    m = record3["layers"]["2.attn_out"]
    assert m["hook_name"] == "blocks.2.hook_attn_out" and math.isfinite(m["ce_increase"])
    assert load_sae(out / "blocks.2.hook_attn_out").cfg.metadata.hook_name == m["hook_name"]
    assert "2.attn_out" in format_metrics_table(record3)


def test_decoder_bias_starts_at_the_scaled_activation_mean(tmp_path):
    model = tiny_model()
    rows = [[int(t) for t in torch.randint(0, model.cfg.d_vocab, (12,))] for _ in range(3)]
    cfg = SAETrainingConfig(layers=(1, 2), d_sae=32, k=4, n_rows_for_bias_init=2)
    hooks = [cfg.hook_name(1), cfg.hook_name(2)]
    moments = activation_moments(model, rows[:2], hooks, skip_first_positions=1)
    _, cache = model.run_with_cache(torch.tensor(rows[:2]), names_filter=hooks)
    sae_cfgs = _runner_config(model, cfg, "tiny", tmp_path).saes
    saes = initial_training_saes(model, cfg, sae_cfgs, rows)
    for h in hooks:
        x = cache[h][:, 1:].reshape(-1, model.cfg.d_model)  # position 0 left out
        mean, mean_norm = moments[h]
        torch.testing.assert_close(mean, x.mean(0), rtol=1e-5, atol=1e-5)
        assert mean_norm == pytest.approx(float(x.norm(dim=-1).mean()), rel=1e-5)
        scaled = x * (math.sqrt(model.cfg.d_model) / mean_norm)
        torch.testing.assert_close(saes[h].b_dec.detach(), scaled.mean(0), rtol=1e-4, atol=1e-5)
    zero = initial_training_saes(
        model, SAETrainingConfig(layers=(1, 2), decoder_bias_init="zero"), sae_cfgs, rows
    )
    assert all(float(s.b_dec.detach().abs().max()) == 0 for s in zero.values())
    with pytest.raises(ValueError, match="decoder_bias_init"):
        SAETrainingConfig(decoder_bias_init="median")
    with pytest.raises(ValueError, match="site must be one of"):
        SAETrainingConfig(site="hook_z")


def test_cli_registration():
    from spare_tl.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train-saes", "--layers", "3", "4", "--tokens", "1000"])
    assert args.layers == [3, 4] and args.tokens == 1000 and callable(args.func)
    args = parser.parse_args(["train-saes", "--site", "attn_out", "--layers", "20"])
    assert args.site == "attn_out"
    args = parser.parse_args(["sae-metrics", "/tmp/x"])
    assert args.directory == "/tmp/x"
