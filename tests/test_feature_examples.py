"""The feature-examples stage on a tiny random model: its bounded top-k against brute force."""

from __future__ import annotations

import pytest
import torch

from spare_tl.saes import encode_latents
from spare_tl.stages.feature_examples import (
    FeatureExamples,
    FeatureExamplesConfig,
    collect_examples,
    feature_examples,
    text_passages,
    top_k_merge,
)
from spare_tl.testing import conflict_items, tiny_sae

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
CONFIG = FeatureExamplesConfig(k=4, n_text=12, text_tokens=10, batch_size=5, n_bins=8)


@pytest.fixture(scope="module")
def saes():
    return {h: tiny_sae(h, seed=i, k=16) for i, h in enumerate(HOOKS)}


def _brute_force(model, sae, hook, passages, k):
    """Per latent: every passage's largest activation (BOS excluded), then the top k."""
    best = []
    for ids in passages:
        _, store = model.run_with_cache(torch.tensor([ids]))
        codes = encode_latents(sae, store[hook])[0, 1:]
        best.append(codes.max(0).values)
    best = torch.stack(best)  # (n_passages, d_sae)
    return torch.topk(best, k, dim=0), best


def test_top_k_merge_keeps_the_largest():
    values = torch.tensor([[5.0, 1.0], [3.0, 0.5]])
    index = torch.tensor([[0, 0], [1, 1]])
    v, i = top_k_merge(values, index, torch.tensor([[4.0, 2.0]]), torch.tensor([[7, 7]]), 2)
    assert v.tolist() == [[5.0, 2.0], [4.0, 1.0]]
    assert i.tolist() == [[0, 7], [7, 0]]


def test_top_k_equals_brute_force(tiny_model, saes):
    passages = text_passages(tiny_model, conflict_items(6), 12, 10, seed=0)
    passages[3] = passages[3][:5]  # uneven lengths: right padding must not count
    latents = {HOOKS[0]: [0, 5, 9]}
    trackers, last = collect_examples(tiny_model, saes, passages, CONFIG, latents, progress=False)
    for hook in HOOKS:
        top, best = _brute_force(tiny_model, saes[hook], hook, passages, CONFIG.k)
        got = trackers[hook]
        assert torch.allclose(got.values, top.values, atol=1e-5)
        # equal passages tie: each kept passage must really score its value, none twice
        kept = torch.gather(best, 0, got.passage)
        assert torch.allclose(kept, got.values, atol=1e-5)
        for latent in range(best.shape[1]):
            assert len(set(got.passage[:, latent].tolist())) == CONFIG.k
        assert got.n_tokens == sum(len(p) - 1 for p in passages)
    tracker = trackers[HOOKS[0]]
    for j, latent in enumerate(latents[HOOKS[0]]):
        for value, pid in zip(tracker.values[:, latent], tracker.passage[:, latent]):
            if value > 0:  # the kept window holds the passage's largest activation
                assert torch.isclose(torch.nan_to_num(tracker.windows[int(pid)][j]).max(), value)
    assert last[HOOKS[0]].shape == (len(passages), 3)


def test_stage_saves_resumes_and_loads(tiny_model, saes, tmp_path):
    grouped = [
        {"prompt": f"context: X{i} is c{i}.\nquestion: q{i}?\nanswer:", "label": lab}
        for i, lab in enumerate(["context", "memory", "neither"] * 3)
    ]
    items = conflict_items(6)
    latents = {h: [1, 2, 3] for h in HOOKS}
    kwargs = dict(latents=latents, config=CONFIG, directory=tmp_path, progress=False)
    first = feature_examples(tiny_model, saes, grouped, items, **kwargs)
    loaded = FeatureExamples.load(tmp_path)
    card = loaded.of(HOOKS[1], 2)
    assert card == first.of(HOOKS[1], 2)
    assert len(card["last_position"]["context"]) == 3
    assert set(card["examples"]) == {"grouped", "text"}
    assert sum(card["histogram"]) > 0 or card["density"]["text"] == 0
    for ex in card["examples"]["text"]:
        assert len(ex["tokens"]) == len(ex["activations"])
        assert max(ex["activations"]) == pytest.approx(ex["activation"], abs=1e-3)
    with pytest.raises(ValueError, match="no saved examples"):
        loaded.of(HOOKS[1], 50)
    # resumable: one SAE's files survive a stop; the rerun recomputes only the other
    (tmp_path / "config.json").unlink()
    (tmp_path / f"{HOOKS[0]}.json").unlink()
    again = feature_examples(tiny_model, saes, grouped, items, **kwargs)
    assert again.of(HOOKS[0], 1) == first.of(HOOKS[0], 1)
    assert FeatureExamples.load(tmp_path).of(HOOKS[1], 3) == first.of(HOOKS[1], 3)
