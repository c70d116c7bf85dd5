"""Feature cards on a tiny random model: the card's parts, text, HTML, ordering and links."""

from __future__ import annotations

import pytest
import torch

from spare_tl.cli.features import parse_target
from spare_tl.features import FunctionalFeatures, LayerFeatures
from spare_tl.stages.feature_examples import FeatureExamplesConfig, feature_examples
from spare_tl.stages.statistics import LayerStatistics
from spare_tl.testing import conflict_items, tiny_sae
from spare_tl.viz.feature_card import feature_card, functional_feature_cards, neuronpedia_link

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"


def _statistics() -> LayerStatistics:
    g = torch.Generator().manual_seed(0)
    return LayerStatistics(
        layer=1,
        hook_name=HOOK,
        sae_id="tiny",
        mutual_information=torch.rand(128, generator=g),
        expectation=torch.randn(128, generator=g),
        context_activations=torch.rand(128, generator=g),
        memory_activations=torch.rand(128, generator=g),
        n_context=3,
        n_memory=3,
    )


def _features() -> FunctionalFeatures:
    stats = _statistics()
    layer = LayerFeatures(
        layer=1,
        hook_name=HOOK,
        context_features=torch.tensor([3, 4]),
        memory_features=torch.tensor([5]),
        context_activations=stats.context_activations,
        memory_activations=stats.memory_activations,
    )
    return FunctionalFeatures("tiny-llama", {1: layer}, proportion=0.1)


def _effect(gain: float) -> dict:
    shares = {"EM_C": 50.0 + gain, "EM_M": 20.0, "neither": 30.0 - gain}
    return {
        "layer": 1,
        "latent": 0,
        "role": "context",
        "edit": "added",
        "only": shares,
        "without": shares,
        "gain": gain,
        "loss_without": 1.0,
        "neither_added": -gain,
    }


class _Effects:
    def __init__(self, gains: dict[int, float]) -> None:
        self.gains = gains

    def of(self, layer: int, latent: int) -> dict:
        return {"context": _effect(self.gains[latent])}


@pytest.fixture(scope="module")
def examples(tiny_model):
    sae = tiny_sae(HOOK, seed=1, k=32)
    grouped = [
        {"prompt": f"context: X{i} is c{i}.\nquestion: q{i}?\nanswer:", "label": lab}
        for i, lab in enumerate(["context", "memory"] * 4)
    ]
    config = FeatureExamplesConfig(k=3, n_text=10, text_tokens=12, n_bins=6, batch_size=4)
    result = feature_examples(
        tiny_model,
        {HOOK: sae},
        grouped,
        conflict_items(6),
        latents={HOOK: [3, 4, 5]},
        config=config,
        progress=False,
    )
    return result, sae


def test_card_shows_every_part(tiny_model, examples):
    result, sae = examples
    ex = result.of(HOOK, 4)
    card = feature_card(
        1,
        4,
        statistics=_statistics(),
        features=_features().layers[1],
        examples=ex,
        effects={"context": _effect(12.5)},
    )
    assert card.role == "context feature"
    assert card.statistics["mutual_information_rank"] >= 1
    assert len(card.promoted) == 10 and card.promoted == ex["promoted"]  # from the stage
    text = card.to_text()
    assert "Layer 1 resid_post, latent 4, context feature" in text
    assert "gain +12.5" in text and "promotes:" in text
    page = card.to_html(open_=True, div_id="c1")
    assert page.startswith("<details class='feature-card' open>")
    assert "EM_C alone" in page and "last prompt token, by behaviour" in page
    has_examples = any(ex["examples"][s] for s in ("grouped", "text"))
    assert ("rgba(255, 127, 14" in page) == has_examples
    if ex["examples"]["text"]:
        assert "[[" in text  # the firing token is marked
    fig = card.figure()
    assert len(fig.data) >= 2


def test_cards_are_ordered_by_causal_effect(examples):
    result, _ = examples
    cards = functional_feature_cards(
        _features(),
        statistics={1: _statistics()},
        examples=result,
        effects=_Effects({3: 1.0, 4: 9.0, 5: -2.0}),
    )
    assert [c.latent for c in cards] == [4, 3, 5]
    assert [c.role for c in cards] == ["context feature", "context feature", "memory feature"]


def test_neuronpedia_link_from_release_metadata():
    sae = tiny_sae(HOOK)
    assert neuronpedia_link(sae, 7) is None
    sae.cfg.metadata.neuronpedia_id = "gpt2-small/1-res-jb"
    assert neuronpedia_link(sae, 7) == "https://www.neuronpedia.org/gpt2-small/1-res-jb/7"


def test_parse_target():
    assert parse_target("12:345") == (12, 345)
    with pytest.raises(ValueError, match="LAYER:LATENT"):
        parse_target("12")


def test_features_show_needs_layer_and_latent(capsys):
    from spare_tl.cli import main

    assert main(["features", "show", "12"]) == 2
    assert "features show needs LAYER:LATENT" in capsys.readouterr().err
    assert main(["features", "effects", "12:3"]) == 2
    assert "takes no '12:3'" in capsys.readouterr().err
