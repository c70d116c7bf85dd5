"""Exact-match scoring of generated answers, and the behaviour label it implies.

SQuAD-style exact match (Rajpurkar et al. 2016), as used by SpARE: both strings are
normalised (Unicode NFD, lower-case, punctuation removed, articles a/an/the removed, white
space collapsed) and compared for equality against any candidate answer. Macnoise scores a
*context* answer differently: it counts as correct when the normalised prediction occurs
anywhere inside the normalised ``sub_context`` (:func:`exact_match_in_context`).

Every function here is pure and does no post-processing of the generation: cut the raw
model output with :func:`clean_prediction` first (the paper keeps the text before the first
newline, stripped).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from spare_tl.data.schema import ConflictItem

Behaviour = Literal["context", "memory", "neither"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

#: ``ConflictItem.extra`` key: score the context answer with :func:`exact_match_in_context`.
EM_IN_CONTEXT = "em_in_context"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: NFD, lower-case, drop punctuation and articles, collapse spaces.

    The NFD step follows SpARE's released scorer; it makes composed and decomposed
    spellings of accented letters compare equal.
    """
    text = unicodedata.normalize("NFD", text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def clean_prediction(text: str) -> str:
    """The answer part of a generation: the text before the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(prediction: str, candidates: str | Iterable[str]) -> bool:
    """Whether the normalised prediction equals any normalised candidate.

    A prediction that normalises to the empty string never matches.
    """
    if isinstance(candidates, str):
        candidates = (candidates,)
    pred = normalize_answer(prediction)
    if not pred:
        return False
    return any(pred == normalize_answer(c) for c in candidates)


def exact_match_in_context(prediction: str, context: str) -> bool:
    """Macnoise's context score: the normalised prediction occurs inside the normalised context.

    It is a plain substring test, as in the released code. Unlike the released code, a
    prediction that normalises to the empty string never matches (the empty string is a
    substring of every context).
    """
    pred = normalize_answer(prediction)
    return bool(pred) and pred in normalize_answer(context)


def context_match(prediction: str, item: ConflictItem) -> bool:
    """Whether the prediction is the context's answer C (``sub_answer``).

    Items with ``extra["em_in_context"]`` true (Macnoise) use :func:`exact_match_in_context`
    against ``sub_context`` instead of exact match against ``sub_answer``.
    """
    if item.extra.get(EM_IN_CONTEXT):
        return exact_match_in_context(prediction, item.sub_context)
    return exact_match(prediction, item.sub_answer)


def memory_match(prediction: str, item: ConflictItem) -> bool:
    """Whether the prediction is the memorised answer M (``org_answer``)."""
    return exact_match(prediction, item.org_answer)


def behaviour_label(prediction: str, item: ConflictItem) -> Behaviour:
    """Which knowledge the (cleaned) prediction used: ``context``, ``memory`` or ``neither``.

    ``context`` when it matches C, ``memory`` when it matches M. If it matches both, the
    source cannot be told apart and the label is ``neither`` (such a prompt is dropped, as
    the original code refuses these too). With plain exact match this cannot happen for a
    valid item, whose C and M differ after normalisation; with Macnoise's in-context score it
    can, when ``sub_context`` still mentions M.
    """
    uses_context = context_match(prediction, item)
    uses_memory = memory_match(prediction, item)
    if uses_context and not uses_memory:
        return "context"
    if uses_memory and not uses_context:
        return "memory"
    return "neither"


def contains_answer(prediction: str, candidates: str | Iterable[str]) -> bool:
    """Whether any normalised candidate occurs in the normalised prediction as whole words.

    Looser than exact match: ``"author J.K. Rowling"`` contains ``"J.K. Rowling"``. Beside
    exact match it tells a broken answer format (the fact is there, wrapped) from a wrong
    fact (it is not there at all).
    """
    if isinstance(candidates, str):
        candidates = (candidates,)
    pred = f" {normalize_answer(prediction)} "
    if not pred.strip():
        return False
    return any(
        bool(norm) and f" {norm} " in pred for norm in (normalize_answer(c) for c in candidates)
    )


def containment_label(prediction: str, item: ConflictItem) -> Behaviour:
    """:func:`behaviour_label` by containment: ``context`` when the prediction contains C and
    not M, ``memory`` when it contains M and not C, else ``neither``."""
    has_c = contains_answer(prediction, item.sub_answer)
    has_m = contains_answer(prediction, item.org_answer)
    if has_c and not has_m:
        return "context"
    if has_m and not has_c:
        return "memory"
    return "neither"
