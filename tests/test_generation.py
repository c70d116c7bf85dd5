from __future__ import annotations

import numpy as np
import pytest
import torch

from spare_tl.data.prompts import Questions, conflict_prompt
from spare_tl.errors import PromptTooLongError
from spare_tl.generation import Decoding, answer_nll, greedy_generate, left_pad
from spare_tl.testing import conflict_items


def test_batched_generation_equals_single_runs(tiny_model):
    prompts = ["context: a\nquestion: b?\nanswer:", "hi", "question: what is x?\nanswer:"]
    batched = greedy_generate(tiny_model, prompts, max_new_tokens=6, batch_size=3, progress=False)
    singles = [
        greedy_generate(tiny_model, [p], max_new_tokens=6, batch_size=1, progress=False)[0]
        for p in prompts
    ]
    assert batched == singles
    assert all("\n" not in out for out in batched)


def test_left_padded_logits_match_unpadded(tiny_model):
    ids = [[0, 5, 6, 7, 8], [0, 9, 10]]
    tokens, mask = left_pad(tiny_model, ids)
    padded = tiny_model(tokens, attention_mask=mask, padding_side="left")
    for row, seq in enumerate(ids):
        alone = tiny_model(torch.tensor([seq]))
        assert torch.allclose(padded[row, -len(seq) :], alone[0], atol=1e-5)


def test_answer_nll_equals_manual_computation(tiny_model):
    prompt, answer = "question: q\nanswer:", "Paris"
    nll = answer_nll(tiny_model, [prompt, "x"], [answer, "yy"])
    full = tiny_model.to_tokens(prompt + " " + answer)
    n = len(tiny_model.tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    lp = tiny_model(full).log_softmax(-1)[0, -n - 1 : -1]
    manual = -lp.gather(-1, full[0, -n:, None]).mean()
    assert nll[0].item() == pytest.approx(manual.item(), abs=1e-5)
    assert nll.shape == (2,)


def test_prompt_longer_than_context_window_is_refused(tiny_model):
    with pytest.raises(PromptTooLongError, match="context window of 256"):
        greedy_generate(tiny_model, ["x" * 300], progress=False)


def test_matches_transformer_lens_generate(tiny_model):
    prompts = ["context: x\nquestion: y?\nanswer:", "abc"]
    ours = greedy_generate(
        tiny_model, prompts, max_new_tokens=6, stop_at_newline=False, progress=False
    )
    for p, o in zip(prompts, ours):
        ref = tiny_model.generate(
            p, max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False
        )
        assert ref[len(p) :] == o


def test_scores_from_the_frozen_cache_equal_separate_passes(tiny_model):
    from spare_tl.generation import generate_and_score

    prompts = ["question: q\nanswer:", "context: long one\nquestion: z\nanswer:"]
    answers = [["Paris", "Lyon city"], ["ab", "c"]]
    texts, nll = generate_and_score(tiny_model, prompts, answers, max_new_tokens=3, progress=False)
    for a in range(2):
        ref = answer_nll(tiny_model, prompts, [row[a] for row in answers])
        assert torch.allclose(nll[:, a], ref, atol=1e-4)
    assert texts == greedy_generate(tiny_model, prompts, max_new_tokens=3, progress=False)


def test_shared_prefix_gives_the_same_answers(tiny_model):
    prefix = "question: a?\nanswer: b\n\nquestion: cc?\nanswer: d\n\n"
    suffixes = ["question: x?\nanswer:", "question: longer one?\nanswer:", "q"]
    joint = greedy_generate(
        tiny_model, [prefix + s for s in suffixes], max_new_tokens=5, progress=False
    )
    shared = greedy_generate(
        tiny_model, suffixes, prefix=prefix, max_new_tokens=5, batch_size=2, progress=False
    )
    assert shared == joint


def test_decoding_object_and_keywords_give_the_same_answers(tiny_model):
    prompts = ["context: a\nquestion: b?\nanswer:", "hi"]
    dec = Decoding(max_new_tokens=5, batch_size=1, progress=False)
    by_object = greedy_generate(tiny_model, prompts, decoding=dec)
    by_keywords = greedy_generate(tiny_model, prompts, max_new_tokens=5, progress=False)
    assert by_object == by_keywords
    # keywords override the object's fields; defaults apply only without an object
    assert Decoding.of(dec, {"batch_size": 8}) == Decoding(5, 8, progress=False)
    assert Decoding.of(None, {}, desc="CAD").desc == "CAD"
    assert Decoding.of(dec, {}, desc="CAD") is dec


def test_decoding_refuses_bad_values_and_unknown_options(tiny_model):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        Decoding(max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got True"):
        Decoding(batch_size=True)
    assert Decoding(max_new_tokens=np.int64(3)).max_new_tokens == 3  # any integral type
    with pytest.raises(ValueError, match="batch_size"):
        greedy_generate(tiny_model, ["hi"], batch_size=0)
    with pytest.raises(TypeError, match="unknown decoding options \\['max_tokens'\\]"):
        greedy_generate(tiny_model, ["hi"], max_tokens=3)  # type: ignore[call-arg]


def test_questions_check_their_shape_once():
    items = conflict_items(3)
    demos = [items[:1], items[1:2], items[:2]]
    questions = Questions(items, demos, "dss")
    assert len(questions) == 3
    assert questions.prompts() == [conflict_prompt(it, d, "dss") for it, d in zip(items, demos)]
    assert questions.prompts("doo")[2] == conflict_prompt(items[2], demos[2], "doo")
    with pytest.raises(ValueError, match="one list of demonstrations per item"):
        Questions(items, demos[:2])
    with pytest.raises(ValueError, match="unknown demonstration type"):
        Questions(items, demos, "xyz")


def _seed_prompts() -> list[str]:
    """Prompts of one seed under the paper's protocol: the same demonstrations before every
    item, items of different lengths (so batches are left-padded)."""
    items = conflict_items(6, start=50)
    demos = conflict_items(3)
    return [conflict_prompt(it, demos, "doo") for it in items[:5]] + [
        conflict_prompt(items[5], demos, "doo") + " and a longer tail of words"
    ]


def test_the_demonstration_prefix_is_found_on_the_full_prompts_tokens(tiny_model):
    from os.path import commonprefix

    from spare_tl.generation import MIN_SHARED_PREFIX, PromptPrefix, _tokenize

    tokens = _tokenize(tiny_model, _seed_prompts())
    prefix = PromptPrefix.of(tiny_model, tokens)
    assert prefix.length == len(commonprefix(tokens)) >= MIN_SHARED_PREFIX
    assert all(p[: prefix.length] + own == p for p, own in zip(tokens, prefix.own(tokens)))
    assert PromptPrefix.of(tiny_model, tokens, enabled=False).length == 0
    assert PromptPrefix.of(tiny_model, tokens[:1]).length == 0
    short = [t[:5] for t in tokens]
    assert PromptPrefix.of(tiny_model, short).length == 0  # below the threshold


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_the_demonstration_prefix_run_once_gives_the_full_pass_answers(tiny_model, batch_size):
    from spare_tl.generation import generate_shared_prefix

    prompts = _seed_prompts()
    dec = Decoding(max_new_tokens=6, batch_size=batch_size, progress=False)
    conditions = {"none": None}
    once = generate_shared_prefix(tiny_model, prompts, conditions, decoding=dec)
    per_batch = generate_shared_prefix(
        tiny_model, prompts, conditions, decoding=dec, shared_demonstrations=False
    )
    assert once == per_batch
    assert once["none"] == greedy_generate(tiny_model, prompts, decoding=dec)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_cad_runs_each_prompt_versions_prefix_once_with_the_same_answers(tiny_model, batch_size):
    from spare_tl.methods.baselines import cad_generate

    prompts = _seed_prompts()
    closed = [p.replace("context: ", "") for p in prompts]
    dec = Decoding(max_new_tokens=5, batch_size=batch_size, progress=False)
    for alpha in (0.5, -1.0):
        once = cad_generate(tiny_model, prompts, closed, alpha, decoding=dec)
        full = cad_generate(
            tiny_model, prompts, closed, alpha, decoding=dec, shared_demonstrations=False
        )
        assert once == full


def test_stacked_caches_continue_each_row_as_it_would_alone(tiny_model):
    """CAD decodes its two prompt versions as one batch: caches of different lengths,
    stacked with masked left padding, give every row the next-token logits it gets alone."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from spare_tl.generation import _last_logits, _tokenize
    from spare_tl.kv_cache import stack_caches

    model = tiny_model
    groups = [_seed_prompts()[:3], ["short one", "a"]]
    caches, alone = [], []
    nxt = torch.tensor([[5]])
    for prompts in groups:
        tokens, mask = left_pad(model, _tokenize(model, prompts))
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(prompts))
        model(tokens, attention_mask=mask, past_kv_cache=kv, stop_at_layer=model.cfg.n_layers)
        caches.append(kv)
        # each group alone, one more token, from a copy of its cache
        solo = stack_caches(model, [kv])
        step = nxt.expand(len(prompts), 1)
        resid = model(
            step,
            attention_mask=torch.ones_like(step),
            past_kv_cache=solo,
            stop_at_layer=model.cfg.n_layers,
        )
        alone.append(_last_logits(model, resid[:, -1]))
    lengths = {kv.previous_attention_mask.shape[1] for kv in caches}
    assert len(lengths) == 2  # the caches really differ in length
    both = stack_caches(model, caches)
    step = nxt.expand(5, 1)
    resid = model(
        step,
        attention_mask=torch.ones_like(step),
        past_kv_cache=both,
        stop_at_layer=model.cfg.n_layers,
    )
    torch.testing.assert_close(
        _last_logits(model, resid[:, -1]), torch.cat(alone), atol=1e-4, rtol=1e-4
    )
    assert caches[1].previous_attention_mask.shape[1] == min(lengths)  # inputs untouched


@pytest.mark.parametrize("batch_size", [1, 4])
def test_conditions_decoded_together_answer_as_each_alone(tiny_model, batch_size):
    """Several conditions' rows decode as one batch (``decode_rows``); every condition's
    answers equal those it gives decoded alone, and one alone equals plain generation."""
    from spare_tl.generation import generate_shared_prefix

    def push(scale: float):
        def hook(resid, hook):
            resid[:, -1] += scale * resid[:, -1].norm(dim=-1, keepdim=True)
            return resid

        def start(rows):
            return tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", hook)])

        return start

    prompts = _seed_prompts()
    conditions = {"none": None, "up": push(0.5), "down": push(-0.5), "more": push(1.5)}
    together = Decoding(max_new_tokens=6, batch_size=batch_size, progress=False)
    alone = Decoding(max_new_tokens=6, batch_size=batch_size, progress=False, decode_rows=1)
    seconds: dict[str, float] = {}
    joint = generate_shared_prefix(
        tiny_model, prompts, conditions, decoding=together, seconds=seconds
    )
    single = generate_shared_prefix(tiny_model, prompts, conditions, decoding=alone)
    assert joint == single
    assert len({tuple(v) for v in joint.values()}) > 1  # the conditions answer differently
    assert joint["none"] == greedy_generate(tiny_model, prompts, decoding=together)
    assert set(seconds) == {"prefix", *conditions} and all(v > 0 for v in seconds.values())
    with pytest.raises(ValueError, match="decode_rows"):
        Decoding(decode_rows=0)


@pytest.mark.parametrize("decode_rows", [1, 6, 128])
def test_prompt_sets_decoded_together_answer_as_each_alone(tiny_model, decode_rows):
    """Rows of several prompt sets (other demonstrations, other lengths) and conditions fill
    the same decoding forwards, across batches; every answer equals the set's own run."""
    from spare_tl.generation import generate_prompt_sets, generate_shared_prefix

    def push(scale: float):
        def hook(resid, hook):
            resid[:, -1] += scale * resid[:, -1].norm(dim=-1, keepdim=True)
            return resid

        return lambda rows: tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", hook)])

    items, demos = conflict_items(5, start=70), conflict_items(4, start=20)
    other = [conflict_prompt(it, demos[:2], "dss") for it in items]
    sets = [
        (_seed_prompts(), {"a|none": None, "a|up": push(0.5)}),
        (other, {"b|none": None, "b|down": push(-0.5)}),
        (_seed_prompts()[:3], {"c|none": None}),
    ]
    decoding = Decoding(max_new_tokens=5, batch_size=4, progress=False, decode_rows=decode_rows)
    seconds: dict[str, float] = {}
    per_set = [0.0, 0.0, 0.0]
    joint = generate_prompt_sets(
        tiny_model, sets, decoding=decoding, seconds=seconds, set_seconds=per_set
    )
    alone = Decoding(max_new_tokens=5, batch_size=4, progress=False, decode_rows=1)
    for prompts, conditions in sets:
        own = generate_shared_prefix(tiny_model, prompts, conditions, decoding=alone)
        assert {name: joint[name] for name in conditions} == own
    assert all(v > 0 for v in per_set) and sum(per_set) == pytest.approx(seconds["prefix"])
    with pytest.raises(ValueError, match="unique"):
        generate_prompt_sets(tiny_model, [sets[0], sets[0]], decoding=decoding)
    with pytest.raises(ValueError, match="set_seconds"):
        generate_prompt_sets(tiny_model, sets, decoding=decoding, set_seconds=[0.0])
