"""Unit tests for SQuAD-style normalisation, exact match and the behaviour label."""

from __future__ import annotations

import pytest

from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import (
    behaviour_label,
    clean_prediction,
    context_match,
    exact_match,
    exact_match_in_context,
    memory_match,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("  The   Eiffel Tower ", "eiffel tower"),
        ("a cat, an owl and the dog.", "cat owl and dog"),
        ("U.S.A.", "usa"),
        ("Theatre of the Absurd", "theatre of absurd"),  # 'the' only as a whole word
        ("Anne-Marie", "annemarie"),
        ("\tline\nbreaks\r\n", "line breaks"),
        ("", ""),
        ("The", ""),
        ("!!!", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_answer_composed_and_decomposed_accents_agree() -> None:
    composed, decomposed = "Nerg\u00e5rd", "Nerga\u030ard"
    assert normalize_answer(composed) == normalize_answer(decomposed)
    assert exact_match(composed, [decomposed])


def test_exact_match_any_candidate() -> None:
    assert exact_match("the Nile", ["Amazon", "Nile"])
    assert exact_match("NILE.", "Nile")  # a bare string is one candidate
    assert not exact_match("Nile River", ["Nile"])
    assert not exact_match("Paris", [])


def test_exact_match_empty_prediction_never_matches() -> None:
    assert not exact_match("", [""])
    assert not exact_match("the", ["a"])


def test_exact_match_in_context() -> None:
    ctx = "The Amazon River, in South America, is the longest river."
    assert exact_match_in_context("amazon river", ctx)
    assert exact_match_in_context("The Amazon River.", ctx)
    assert not exact_match_in_context("Nile", ctx)
    assert not exact_match_in_context("", ctx)
    assert not exact_match_in_context("  the ", ctx)


def test_clean_prediction() -> None:
    assert clean_prediction(" Paris\n\ncontext: ...") == "Paris"
    assert clean_prediction("  Lyon  ") == "Lyon"
    assert clean_prediction("\nParis") == ""
    assert clean_prediction("") == ""


ITEM = ConflictItem(
    question="What is the capital of France?",
    org_context="Paris is the capital of France.",
    org_answer=("Paris",),
    sub_context="Lyon is the capital of France. Paris is a village.",
    sub_answer=("Lyon",),
)


@pytest.mark.parametrize(
    ("prediction", "label"),
    [("Lyon", "context"), ("lyon.", "context"), ("Paris", "memory"), ("Marseille", "neither")],
)
def test_behaviour_label(prediction: str, label: str) -> None:
    assert behaviour_label(prediction, ITEM) == label


def test_macnoise_variant_scores_context_by_containment() -> None:
    mac = ConflictItem(
        question=ITEM.question,
        org_context=ITEM.org_context,
        org_answer=ITEM.org_answer,
        sub_context="The capital of France is the city of Lyon.",
        sub_answer=("Lyon, France",),
        extra={"em_in_context": True},
    )
    assert not exact_match("city of Lyon", mac.sub_answer)
    assert context_match("city of Lyon", mac)
    assert behaviour_label("city of Lyon", mac) == "context"
    assert behaviour_label("Paris", mac) == "memory"


def test_both_matching_is_neither() -> None:
    # Macnoise's containment score can match M too when sub_context still mentions it.
    mac = ConflictItem(**{**ITEM.to_dict(), "extra": {"em_in_context": True}})
    assert context_match("Paris", mac) and memory_match("Paris", mac)
    assert behaviour_label("Paris", mac) == "neither"
