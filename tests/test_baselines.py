"""Baselines in SpARE's harness (ActAdd, task vectors, CAD, ICL) on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from spare_tl import cache
from spare_tl.data.prompts import PoolSplit, Questions, conflict_prompt
from spare_tl.features import FunctionalFeatures
from spare_tl.generation import Decoding, _tokenize, greedy_generate
from spare_tl.methods.base import NoSteering, PromptMethod, SteeringMethod
from spare_tl.methods.baselines import (
    CAD,
    ICL,
    ActAdd,
    PerDirection,
    TaskVector,
    cad_generate,
    contrastive_scores,
    mean_difference,
    prompt_without_context,
    task_vector_prompts,
)
from spare_tl.methods.spare import SpareMethod, resid_post_hook_name
from spare_tl.stages.activations import last_position_resid
from spare_tl.stages.behaviours import GroupedPrompts
from spare_tl.stages.evaluation import (
    CONDITION_OF,
    EvaluationConfig,
    evaluate,
    evaluation_demonstrations,
)
from spare_tl.stages.sweep import parse_layer_set
from spare_tl.studies import baselines as bl
from spare_tl.studies.baseline_setup import METHODS, BaselineSetup, actadd_vectors
from spare_tl.studies.baseline_sweep import (
    best_hyperparameters,
    evaluate_method,
    save_method_sweep,
    sweep_method,
    sweep_path,
)
from spare_tl.testing import conflict_items, tiny_features, tiny_sae
from spare_tl.viz.tables import baselines_markdown

LAYERS = (1, 2)
CONFIG = EvaluationConfig(seeds=(0, 1), n_shots=2, max_new_tokens=3, batch_size=4)
GEN = dict(max_new_tokens=4, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


_items = conflict_items


POOL, HELD_OUT = _items(8), _items(5, start=100)
DEV = _items(4, start=200)  # development questions: neither pool nor test


def _grouped() -> GroupedPrompts:
    records = [
        {
            "prompt": conflict_prompt(it, POOL[:1], "dss") + " x" * (i % 3),
            "label": ["context", "memory", "neither"][i % 3],
            "demo_type": "dss",
            "shots": 1,
            "nll_context": 1.0,
            "nll_memory": 2.0,
        }
        for i, it in enumerate(POOL * 2)
    ]
    return GroupedPrompts("tiny-llama", records, {"model": "tiny-llama"})


def _features() -> FunctionalFeatures:
    return tiny_features(layers=LAYERS)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    saes = {layer: tiny_sae(resid_post_hook_name(layer), seed=layer) for layer in LAYERS}
    return BaselineSetup(
        tiny_model,
        _features(),
        saes,
        POOL,
        HELD_OUT,
        HELD_OUT,
        grouped=_grouped(),
        cache_root=tmp_path_factory.mktemp("cache"),
        task_vector_prompts=4,
        progress=False,
    )


SETTINGS = {
    "none": {},
    "closed_book": {},
    "spare": {},
    "icl": {},
    "actadd": {"layers": [1, 2], "coefficient": 2.0},
    "taskvec": {"layer": 1},
    "cad": {"alpha": 0.5},
}


# ------------------------------------------------------------------ the one interface


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_end_to_end(setup, name):
    method = setup.make(name, SETTINGS[name])
    assert isinstance(method, SteeringMethod) and method.name == name
    result = evaluate_method(setup.model, method, HELD_OUT, POOL, config=CONFIG, progress=False)
    data = result.to_json()
    conditions = ["no_steering"] if name == "none" else list(CONDITION_OF.values())
    for cond in conditions:
        assert len(data[cond]["per_seed"]["EM_C"]) == 2
        assert f"{cond}.prediction" in result.predictions[0]
    assert len(result.predictions) == 2 * len(HELD_OUT)
    meta = data["method"]
    assert meta["name"] == name and set(meta["seconds_per_item"]) == set(conditions)
    assert meta["time_relative_to_no_steering"]["no_steering"] == pytest.approx(1.0)
    assert meta["extra_forward_passes_per_token"] == (1.0 if name == "cad" else 0.0)
    assert meta["inference_time"] is (name not in ("icl", "closed_book"))
    # the unsteered answers are the evaluation's own doo prompts, greedy
    demos = evaluation_demonstrations(HELD_OUT, POOL, CONFIG.n_shots, 0)
    plain = greedy_generate(
        setup.model,
        [conflict_prompt(it, d, "doo") for it, d in zip(HELD_OUT, demos)],
        max_new_tokens=3,
        progress=False,
    )
    assert [p["no_steering.prediction"] for p in result.predictions[: len(HELD_OUT)]] == plain
    if name != "none":  # every method's setting here changes some answer, both ways
        for cond in ("steer_to_context", "steer_to_memory"):
            assert any(
                p[f"{cond}.prediction"] != p["no_steering.prediction"] for p in result.predictions
            )
    with pytest.raises(ValueError, match="pool questions"):
        evaluate_method(setup.model, method, POOL[:2], POOL, config=CONFIG, progress=False)


def test_spare_method_equals_evaluate(setup):
    kwargs = dict(config=CONFIG, progress=False)
    ours = evaluate_method(
        setup.model, SpareMethod(setup.features, setup.saes), HELD_OUT, POOL, **kwargs
    )
    ref = evaluate(setup.model, HELD_OUT, POOL, features=setup.features, saes=setup.saes, **kwargs)
    assert ours.predictions == ref.predictions
    for cond in CONDITION_OF.values():
        assert ours.summary[cond] == ref.summary[cond]
    assert ours.summary["transitions"] == ref.summary["transitions"]
    assert ours.summary["features"] == ref.summary["features"]


def test_icl_picks_dss_and_dso():
    demos = [POOL[:2]] * 2
    icl = ICL()
    for direction, demo_type in (("context", "dss"), ("memory", "dso"), (None, "doo")):
        expected = [conflict_prompt(it, d, demo_type) for it, d in zip(HELD_OUT[:2], demos)]
        assert icl.prompts(Questions(HELD_OUT[:2], demos, "doo"), direction) == expected
    assert icl.hyperparameters("context") == {"demo_type": "dss"}
    assert icl.hyperparameters("memory") == {"demo_type": "dso"}


# ------------------------------------------------------------------ ActAdd and task vectors


def _resid(model, tokens):
    names = [resid_post_hook_name(layer) for layer in range(model.cfg.n_layers)]
    _, store = model.run_with_cache(tokens, names_filter=names)
    return [store[n] for n in names]


def test_actadd_zero_is_identity_and_hooks_go_after_errors(setup):
    model = setup.model
    tokens = model.to_tokens(["context: X1 is c1.\nquestion: q1?\nanswer:"])
    base_logits = model(tokens)
    vectors = setup.actadd_vectors(LAYERS)
    with ActAdd(vectors, LAYERS, 0.0).steering(model, "context"):
        assert torch.equal(model(tokens), base_logits)
    base = _resid(model, tokens)
    for direction, sign in (("context", 1.0), ("memory", -1.0)):
        with ActAdd(vectors, (1,), 2.0).steering(model, direction):
            steered = _resid(model, tokens)
        assert torch.equal(steered[0], base[0])
        assert torch.equal(steered[1][:, :-1], base[1][:, :-1])
        torch.testing.assert_close(steered[1][0, -1], base[1][0, -1] + sign * 2.0 * vectors[1])
    hook_points = [model.hook_dict[resid_post_hook_name(layer)] for layer in LAYERS]
    with pytest.raises(RuntimeError, match="boom"):
        with ActAdd(vectors, LAYERS, 2.0).steering(model, "memory"):
            assert all(len(h.fwd_hooks) == 1 for h in hook_points)
            raise RuntimeError("boom")
    assert all(not h.fwd_hooks for h in hook_points)
    assert torch.equal(model(tokens), base_logits)


def test_actadd_generation_batch_equals_single(setup):
    method = setup.make("actadd", {"layers": [1, 2], "coefficient": 4.0})
    demos = [POOL[:2]] * 4
    batched = method.answer(
        setup.model,
        Questions(HELD_OUT[:4], demos),
        "context",
        Decoding(6, batch_size=4, progress=False),
    )
    singles = [
        method.answer(
            setup.model, Questions([it], [d]), "context", Decoding(6, batch_size=1, progress=False)
        )[0]
        for it, d in zip(HELD_OUT[:4], demos)
    ]
    assert batched == singles


def test_mean_difference_and_cached_activations(setup, tmp_path, monkeypatch):
    from spare_tl.stages import activations as acts_mod

    resid = {3: torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])}
    diff = mean_difference(resid, torch.tensor([1, 1, 0]))
    torch.testing.assert_close(diff[3], torch.tensor([-8.0, 3.0]))
    with pytest.raises(ValueError, match="use-memory"):
        mean_difference(resid, torch.tensor([1, 1, 1]))

    grouped = _grouped()
    cached = acts_mod.collect_activations(setup.model, grouped, [1, 2], cache_root=tmp_path)
    monkeypatch.setattr(acts_mod, "last_position_resid", lambda *a, **k: pytest.fail("recomputed"))
    vectors = actadd_vectors(setup.model, [2], grouped=grouped, cache_root=tmp_path)
    expected = mean_difference({2: cached.resid[2]}, cached.labels)[2]
    torch.testing.assert_close(vectors[2], expected)
    with pytest.raises(ValueError, match="grouped prompts"):
        actadd_vectors(setup.model, [3], cache_root=tmp_path)


def test_taskvec_patch_changes_only_the_last_prompt_position(setup):
    model = setup.model
    vectors = setup.task_vectors([1])
    assert set(vectors) == {"context", "memory"}
    assert not torch.equal(vectors["context"][1], vectors["memory"][1])
    # the task vector is the mean last-position residual of the dss / dso ICL prompts
    prompts = task_vector_prompts(POOL, "dss", n_prompts=4)
    torch.testing.assert_close(
        vectors["context"][1], last_position_resid(model, prompts, [1], progress=False)[1].mean(0)
    )
    method = setup.make("taskvec", {"layer": 1})
    tokens = model.to_tokens(["context: X1 is c1.\nquestion: q1?\nanswer:"])
    base = _resid(model, tokens)
    with method.steering(model, "memory"):
        steered = _resid(model, tokens)
    assert torch.equal(steered[0], base[0])
    for layer in range(1, model.cfg.n_layers):
        assert torch.equal(steered[layer][:, :-1], base[layer][:, :-1])
    torch.testing.assert_close(steered[1][0, -1], vectors["memory"][1])
    assert not model.hook_dict[resid_post_hook_name(1)].fwd_hooks


# ------------------------------------------------------------------ CAD

PROMPTS = [conflict_prompt(it, POOL[:2], "doo") for it in HELD_OUT]
CONTEXT_FREE = [prompt_without_context(it, POOL[:2], "doo") for it in HELD_OUT]


def test_prompt_without_context_drops_only_the_test_context():
    head = conflict_prompt(HELD_OUT[0], POOL[:2], "doo").rsplit("context: ", 1)[0]
    assert CONTEXT_FREE[0] == head + "question: q100?\nanswer:"
    assert "X0 is m0." in CONTEXT_FREE[0] and "X100" not in CONTEXT_FREE[0]


def test_contrastive_scores():
    g = torch.Generator().manual_seed(0)
    lc, ln = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    assert torch.equal(contrastive_scores(lc, ln, 0.0), lc)
    for alpha in (0.5, -0.7):
        paper = (1 + alpha) * lc.log_softmax(-1) - alpha * ln.log_softmax(-1)
        offset = contrastive_scores(lc, ln, alpha) - paper
        torch.testing.assert_close(offset, offset[:, :1].expand_as(offset))


def test_cad_alpha_zero_equals_greedy(tiny_model):
    ours = cad_generate(tiny_model, PROMPTS, CONTEXT_FREE, 0.0, batch_size=3, **GEN)
    assert ours == greedy_generate(tiny_model, PROMPTS, batch_size=3, **GEN)


@pytest.mark.parametrize("alpha", [1.5, -0.8])
def test_cad_batch_equals_single_and_uncached_reference(tiny_model, alpha):
    batched = cad_generate(tiny_model, PROMPTS, CONTEXT_FREE, alpha, batch_size=5, **GEN)
    singles = [
        cad_generate(tiny_model, [p], [q], alpha, batch_size=1, **GEN)[0]
        for p, q in zip(PROMPTS, CONTEXT_FREE)
    ]
    assert batched == singles
    assert batched != greedy_generate(tiny_model, PROMPTS, **GEN)
    # batches of 2 whose answers decode together (up to 128 rows) or each batch alone
    for rows in (128, 6, 2):
        pooled = cad_generate(
            tiny_model, PROMPTS, CONTEXT_FREE, alpha, batch_size=2, decode_rows=rows, **GEN
        )
        assert pooled == singles, rows
    # full re-runs without a KV cache, one prompt at a time, the paper's formula
    for prompt, free, out in zip(PROMPTS[:2], CONTEXT_FREE[:2], batched):
        rows = _tokenize(tiny_model, [prompt, free])
        new = []
        for _ in range(GEN["max_new_tokens"]):
            lc, ln = (tiny_model(torch.tensor([r + new]))[0, -1] for r in rows)
            paper = (1 + alpha) * lc.log_softmax(-1) - alpha * ln.log_softmax(-1)
            new.append(int(paper.argmax()))
        text = tiny_model.tokenizer.decode(new, skip_special_tokens=True)
        assert out == text.split("\n")[0].strip()


def test_cad_method_signs_alpha_by_direction(tiny_model):
    cad = CAD(0.5)
    assert cad.hyperparameters("context") == {"alpha": 0.5}
    assert cad.hyperparameters("memory") == {"alpha": -0.5}
    answers = cad.answer(tiny_model, Questions(HELD_OUT, [POOL[:2]] * 5), "memory", Decoding(**GEN))
    assert answers == cad_generate(tiny_model, PROMPTS, CONTEXT_FREE, -0.5, **GEN)
    with pytest.raises(ValueError, match=">= 0"):
        CAD(-1.0)


# ------------------------------------------------------------------ development sweep


class _Oracle(PromptMethod):
    """Answers C (to context) or M (to memory) for a share of items set by ``k``."""

    name = "oracle"
    shares_prefix = False

    def __init__(self, k: int, seen: list) -> None:
        self.k, self.seen = k, seen

    def hyperparameters(self, direction):
        return {"k": self.k}

    def answer(self, model, questions, direction, decoding=None):
        items = questions.items
        self.seen.extend(it.question for it in items)
        good = {"context": {2}, "memory": {1}}[direction]
        if self.k not in good:
            return ["nope"] * len(items)
        field = "sub_answer" if direction == "context" else "org_answer"
        return [getattr(it, field)[0] for it in items]


def test_sweep_picks_the_dev_best_and_saves_json(setup, tmp_path):
    seen: list[str] = []
    candidates = [_Oracle(k, seen) for k in (0, 1, 2)]
    records = sweep_method(setup.model, candidates, DEV, POOL, n_shots=2, progress=False)
    assert len(records) == 1 + 3 * 2 and records[0]["direction"] == "none"
    assert set(seen) == {it.question for it in DEV}  # the development questions only
    path = tmp_path / "sweep-oracle.json"
    save_method_sweep(records, path, {"method": "oracle"})
    saved = json.loads(path.read_text())
    assert saved["best"]["context"]["hyperparameters"] == {"k": 2}
    assert saved["best"]["memory"]["hyperparameters"] == {"k": 1}
    assert best_hyperparameters(path) == {"context": {"k": 2}, "memory": {"k": 1}}
    with pytest.raises(FileNotFoundError, match="baselines sweep --method cad"):
        best_hyperparameters(tmp_path / "sweep-cad.json")


def test_sweep_on_a_real_method_feeds_evaluation(setup, tmp_path):
    candidates = setup.grid("cad", alphas=[0.5, 2.0])
    records = sweep_method(setup.model, candidates, DEV[:3], POOL, n_shots=2, progress=False)
    assert [r["hyperparameters"] for r in records[1:]] == [
        {"alpha": 0.5},
        {"alpha": -0.5},
        {"alpha": 2.0},
        {"alpha": -2.0},
    ]
    path = tmp_path / "sweep-cad.json"
    save_method_sweep(records, path, {})
    method = setup.method("cad", sweep=path)
    assert isinstance(method, PerDirection) and method.name == "cad"
    best = best_hyperparameters(path)
    assert method.hyperparameters("memory") == best["memory"]
    assert len(setup.grid("actadd", layer_sets=[[1], [1, 2]], coefficients=[1.0, 2.0])) == 4
    (attn,) = setup.grid("actadd", layer_sets=[("attn_out", [2])], coefficients=[1.0])
    assert attn.hyperparameters("memory") == {"layers": [2], "coefficient": 1.0, "site": "attn_out"}
    hooks = attn.hooks(setup.model, "memory")
    assert [name for name, _ in hooks] == ["blocks.2.hook_attn_out"]
    assert [m.hyperparameters("context") for m in setup.grid("taskvec", layers=[1, 2])] == [
        {"layer": 1, "n_prompts": 4},
        {"layer": 2, "n_prompts": 4},
    ]
    with pytest.raises(ValueError, match="spare_tl.stages.sweep"):
        setup.grid("spare")


# ------------------------------------------------------------------ table and command line


def test_table_json_holds_data_only_and_reuse_reruns_stale_methods(setup, tmp_path):
    root = setup.cache_root
    sweep = sweep_path(setup.model.cfg.model_name, "cad", root)
    records = sweep_method(setup.model, [CAD(1.0)], DEV[:2], POOL, n_shots=2, progress=False)
    save_method_sweep(records, sweep, {})
    out = tmp_path / "baselines"
    config = EvaluationConfig(seeds=(0,), n_shots=2, max_new_tokens=2)
    results = bl.run_table(setup, ["none", "icl", "cad"], config=config, n_items=2, out_dir=out)
    table = baselines_markdown(results)
    saved = json.loads((out / "table.json").read_text())
    assert "markdown" not in saved and baselines_markdown(saved) == table  # data only
    rows = saved["rows"]
    assert [r["method"] for r in rows] == ["none", "icl", "cad"]
    assert rows[2]["extra_forward_passes_per_token"] == 1.0
    assert rows[0]["time_relative_to_no_steering"] == 1.0
    assert (out / "cad.json").exists() and (out / "cad-predictions.jsonl").exists()
    assert "| icl * |" in table and "alpha 1.0; alpha -1.0" in table and "EM_C→M" in table
    again = bl.run_table(
        setup, ["none", "icl", "cad"], config=config, n_items=2, out_dir=out, reuse=True
    )
    assert baselines_markdown(again) == table
    (out / "cad.json").write_text(json.dumps(results["cad"] | {"seeds": [7]}))
    bl.run_table(setup, ["cad"], config=config, n_items=2, out_dir=out, reuse=True)
    assert json.loads((out / "cad.json").read_text())["seeds"] == [0]  # stale: re-run
    predictions = out / "icl-predictions.jsonl"
    real = predictions.read_text()
    predictions.write_text(real.replace('"question": "', '"question": "other '))
    bl.run_table(setup, ["icl"], config=config, n_items=2, out_dir=out, reuse=True)
    assert predictions.read_text() == real  # saved for other questions: re-run
    from spare_tl.cli.docs import results_document

    text, missing = results_document(tmp_path)  # the baselines section reads out/<m>.json
    assert table.splitlines()[0] in text and not any(m.startswith("baselines") for m in missing)
    assert all(f"\n| {m}" in text for m in ("none", "icl", "cad"))


def test_cli_method_option(setup, tmp_path, monkeypatch, capsys):
    from spare_tl.cli import build_parser, main
    from spare_tl.cli import commands as cli_commands
    from spare_tl.stages import memorised

    assert set(cli_commands.EVALUATE_METHODS) == set(METHODS)
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--output", "x.json"])
    assert args.method == "spare"
    for name in METHODS:
        assert parser.parse_args(["evaluate", "--output", "x", "--method", name]).method == name
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--output", "x", "--method", "dola"])
    capsys.readouterr()
    args = _baselines_parser().parse_args(
        ["baselines", "sweep", "--method", "actadd", "--layer-sets", "1-2"]
    )
    assert args.method == "actadd" and parse_layer_set(args.layer_sets[0]) == (
        "resid_post",
        [1, 2],
    )
    assert parse_layer_set("attn_out:20-21") == ("attn_out", [20, 21])

    monkeypatch.setattr(
        cli_commands,
        "load_steering_setup",
        lambda *a: (setup.model, setup.features, setup.saes),
    )
    monkeypatch.setattr(
        memorised, "memorised_split", lambda *a, **k: PoolSplit(POOL, HELD_OUT, HELD_OUT, 0)
    )
    output = tmp_path / "cad.json"
    argv = ["evaluate", "--output", str(output), "--seeds", "0", "--n-items", "2", "--shots", "2"]
    code = main([*argv, "--method", "cad", "--hyperparameters", '{"alpha": -0.5}'])
    assert code == 0
    data = json.loads(output.read_text())
    assert data["method"]["hyperparameters"]["memory"] == {"alpha": -0.5}
    assert "method cad" in capsys.readouterr().out
    code = main([*argv, "--method", "actadd", "--sweep", str(tmp_path / "missing.json")])
    assert code == 2 and "no development sweep" in capsys.readouterr().err


def _baselines_parser():
    """``spare-tl`` with only the ``baselines`` registrar."""
    import argparse

    from spare_tl.cli import baselines as cli_baselines

    parser = argparse.ArgumentParser(prog="spare-tl")
    parser.add_argument("-v", "--verbose", action="store_true")
    cli_baselines.register(parser.add_subparsers(dest="command"))
    return parser


def test_baselines_command_line(setup, tmp_path, monkeypatch, capsys):
    from spare_tl.cli import baselines as cli_baselines
    from spare_tl.studies import baseline_setup

    assert cli_baselines.METHODS == baseline_setup.METHODS
    assert cli_baselines.DEFAULT_COEFFICIENTS == baseline_setup.DEFAULT_COEFFICIENTS
    assert cli_baselines.DEFAULT_ALPHAS == baseline_setup.DEFAULT_ALPHAS
    parser = _baselines_parser()
    table = parser.parse_args(["baselines", "table"])
    assert (table.command, table.baselines_command, table.func) == (
        "baselines",
        "table",
        cli_baselines.run,
    )
    assert table.methods == list(METHODS) and table.seeds == [0, 1, 2, 3, 4]
    assert table.n_items == 40 and not table.verbose and not table.reuse
    assert parser.parse_args(["-v", "baselines", "table"]).verbose
    with pytest.raises(SystemExit):
        parser.parse_args(["baselines", "sweep", "--method", "spare"])  # SpARE has its own
    capsys.readouterr()

    output = tmp_path / "sweep-cad.json"
    argv = ["baselines", "sweep", "--method", "cad", "--alphas", "0.5", "--n-items", "2"]
    args = parser.parse_args([*argv, "--shots", "2", "--output", str(output)])
    assert cli_baselines._sweep_command(args, setup) == 0
    saved = json.loads(output.read_text())
    assert [r["hyperparameters"] for r in saved["records"][1:]] == [
        {"alpha": 0.5},
        {"alpha": -0.5},
    ]
    assert saved["config"]["candidates"] == [{"alpha": 0.5}] and saved["config"]["n_items"] == 2
    assert f"wrote {output}" in capsys.readouterr().out

    monkeypatch.setenv("SPARE_TL_CACHE", str(tmp_path / "cache"))
    argv = ["baselines", "table", "--methods", "none", "icl", "--n-items", "2", "--seeds", "0"]
    args = parser.parse_args([*argv, "--shots", "2"])
    assert cli_baselines._table_command(args, setup) == 0
    printed = capsys.readouterr().out
    regenerate = "Regenerate: `spare-tl baselines table --methods none icl --n-items 2 --seeds 0`"
    assert regenerate in printed and "| icl * |" in printed
    out = tmp_path / "cache" / "tiny-llama" / "baselines"
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "icl"]


def test_no_steering_is_a_method():
    assert NoSteering().name == "none" and NoSteering().hyperparameters("context") == {}
    assert isinstance(TaskVector({}, 1), SteeringMethod)


def test_shared_no_steering_gives_the_same_result(setup):
    method = setup.make("actadd", SETTINGS["actadd"])
    alone = evaluate_method(setup.model, method, HELD_OUT, POOL, config=CONFIG, progress=False)
    shared: dict = {}
    first = evaluate_method(
        setup.model,
        NoSteering(),
        HELD_OUT,
        POOL,
        config=CONFIG,
        progress=False,
        shared_no_steering=shared,
    )
    assert set(shared) == set(CONFIG.seeds)
    again = evaluate_method(
        setup.model,
        method,
        HELD_OUT,
        POOL,
        config=CONFIG,
        progress=False,
        shared_no_steering=shared,
    )
    for cond in ("no_steering", "steer_to_context", "steer_to_memory"):
        assert again.summary[cond]["per_seed"] == alone.summary[cond]["per_seed"]
    assert first.summary["no_steering"] == again.summary["no_steering"]
    assert again.predictions == alone.predictions


def test_methods_evaluated_together_equal_each_alone(setup):
    """The table evaluates every method in one harness call per seed (shared prompt passes,
    joint decoding, unedited conditions answered once); each method's answers, shares and
    predictions equal its own evaluation."""
    from spare_tl.methods.baselines import PerDirection
    from spare_tl.stages.evaluation import evaluate_methods

    methods = {name: setup.make(name, SETTINGS[name]) for name in METHODS}
    # CAD as the table has it: α = +1 to context, α = −1 (the closed-book answer) to memory
    methods["cad"] = PerDirection(setup.make("cad", {"alpha": 1.0}), CAD(1.0))
    together = evaluate_methods(setup.model, HELD_OUT, POOL, methods, config=CONFIG, progress=False)
    assert list(together) == list(methods)
    for name, method in methods.items():
        alone = evaluate_method(setup.model, method, HELD_OUT, POOL, config=CONFIG, progress=False)
        assert together[name].predictions == alone.predictions, name
        for cond in ("no_steering", "steer_to_context", "steer_to_memory"):
            assert together[name].summary.get(cond) == alone.summary.get(cond), (name, cond)
        assert together[name].summary["method"]["name"] == method.name
        timing = together[name].summary["method"]["time_relative_to_no_steering"]
        assert all(v > 0 for v in timing.values())
    with pytest.raises(ValueError, match="at least one method"):
        evaluate_methods(setup.model, HELD_OUT, POOL, {}, config=CONFIG)


# ------------------------------------------------------------------ the shared-prefix harness


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    ("batch_size", "sampling"),
    [(1, "per_seed"), (2, "per_seed"), (16, "per_seed"), (4, "per_item")],
)
def test_shared_prefix_answers_equal_full_prompt_passes(setup, name, batch_size, sampling):
    """Every method, every condition: the same answers from the shared prompt pass (and,
    with one demonstration set per seed, the demonstration prefix run once) as from a full
    prompt pass per condition (5 items: batches of 1, 2 or 4 rows, or one left-padded 5)."""
    from spare_tl.stages.harness import Condition, answer_conditions

    method = setup.make(name, SETTINGS[name])
    demos = evaluation_demonstrations(HELD_OUT, POOL, 2, seed=0, sampling=sampling)
    conditions = [
        Condition("no_steering", NoSteering()),
        Condition("to_context", method, "context"),
        Condition("to_memory", method, "memory"),
    ]
    kwargs = dict(max_new_tokens=4, batch_size=batch_size, progress=False)
    questions = Questions(HELD_OUT, demos)
    shared = answer_conditions(setup.model, questions, conditions, **kwargs)
    full = answer_conditions(setup.model, questions, conditions, shared_prefix=False, **kwargs)
    assert shared == full
    assert shared["no_steering"] == greedy_generate(
        setup.model, NoSteering().prompts(questions, None), **kwargs
    )


def test_shared_prefix_edits_the_last_prompt_token_of_every_batch(setup):
    """Steering hooks start fresh in each batch: two equal-sized batches in a row are both
    edited (a leaked hook state would take the second for a KV-cache step)."""
    from spare_tl.methods.spare import LastPromptPositionHook, attach_hooks
    from spare_tl.stages.harness import Condition, answer_conditions

    hooks: list[LastPromptPositionHook] = []

    class Counting(PromptMethod):
        def steering(self, model, direction):
            hooks.append(LastPromptPositionHook(lambda h: h * 1.5))
            return attach_hooks(model, [(resid_post_hook_name(1), hooks[-1])])

    demos = evaluation_demonstrations(HELD_OUT, POOL, 2, seed=0)
    answer_conditions(
        setup.model,
        Questions(HELD_OUT, demos),
        [Condition("none", NoSteering()), Condition("edit", Counting(), "context")],
        max_new_tokens=3,
        batch_size=2,
        progress=False,
    )
    assert [h.calls for h in hooks] == [1, 1, 1]  # batches of 2, 2 and 1 rows


def test_shared_prefix_times_the_prefix_once(setup):
    from spare_tl.stages.harness import Condition, answer_conditions

    seconds: dict[str, float] = {}
    demos = evaluation_demonstrations(HELD_OUT, POOL, 2, seed=0)
    method = setup.make("spare", {})
    answer_conditions(
        setup.model,
        Questions(HELD_OUT, demos),
        [Condition("a", NoSteering()), Condition("b", method, "memory")],
        max_new_tokens=3,
        progress=False,
        seconds=seconds,
    )
    assert set(seconds) == {"prefix", "a", "b"} and all(v > 0 for v in seconds.values())


def test_unedited_conditions_of_the_same_prompts_are_answered_once(setup, monkeypatch):
    """The closed-book row's two directions and CAD at α = −1 are one computation: one
    condition of their prompts reaches the (joint) shared-prefix generation, every name gets
    its answers, and each is timed as what it would cost alone (with its prompts' shared
    pass)."""
    from spare_tl.methods.baselines import ClosedBook
    from spare_tl.stages import harness
    from spare_tl.stages.harness import Condition, answer_conditions

    seen: list[list[int]] = []
    real = harness.generate_prompt_sets

    def spy(model, sets, **kw):
        seen.append([len(conditions) for _, conditions in sets])
        return real(model, sets, **kw)

    monkeypatch.setattr(harness, "generate_prompt_sets", spy)
    questions = Questions(HELD_OUT, evaluation_demonstrations(HELD_OUT, POOL, 2, seed=0))
    conditions = [
        Condition("none", NoSteering()),
        Condition("closed|context", ClosedBook(), "context"),
        Condition("closed|memory", ClosedBook(), "memory"),
        Condition("cad|memory", CAD(1.0), "memory"),
        Condition("spare|memory", setup.make("spare", {}), "memory"),
    ]
    seconds: dict[str, float] = {}
    prefixes: dict[str, float] = {}
    answers = answer_conditions(
        setup.model,
        questions,
        conditions,
        max_new_tokens=4,
        progress=False,
        seconds=seconds,
        prefix_seconds=prefixes,
    )
    # one call: none + spare share the test prompts; the closed-book prompts answered once
    assert [sorted(sizes) for sizes in seen] == [[1, 2]]
    assert answers["closed|context"] == answers["closed|memory"] == answers["cad|memory"]
    assert seconds["closed|memory"] == seconds["closed|context"] == seconds["cad|memory"]
    assert prefixes["none"] == prefixes["spare|memory"] > 0
    assert prefixes["closed|memory"] == prefixes["cad|memory"] > 0
    assert prefixes["none"] + prefixes["closed|memory"] == pytest.approx(seconds["prefix"])


def test_actadd_vectors_are_cached_for_every_layer(tiny_model, tmp_path, monkeypatch):
    """The grouped prompts run once, for every layer; later calls (any layers) read the
    cached vectors, which equal the mean differences computed directly."""
    from spare_tl.methods.baselines import mean_difference
    from spare_tl.stages import activations
    from spare_tl.studies.baseline_setup import ACTADD_STAGE, actadd_vectors

    grouped = _grouped()
    first = actadd_vectors(tiny_model, [1], grouped=grouped, cache_root=tmp_path, progress=False)
    prompts, labels, _ = grouped.labelled()
    direct = mean_difference(
        activations.last_position_resid(tiny_model, prompts, [1, 2], progress=False), labels
    )
    torch.testing.assert_close(first[1], direct[1])

    def refuse(*args, **kwargs):
        raise AssertionError("the grouped prompts ran again")

    monkeypatch.setattr(activations, "last_position_resid", refuse)
    again = actadd_vectors(tiny_model, [2, 1], grouped=grouped, cache_root=tmp_path)
    assert list(again) == [1, 2]
    torch.testing.assert_close(again[2], direct[2])
    assert (tmp_path / cache.model_slug(tiny_model.cfg.model_name) / ACTADD_STAGE).is_dir()
    other = _grouped()
    other.records = other.records[:-1]  # other grouped prompts: another key, computed anew
    with pytest.raises(AssertionError, match="ran again"):
        actadd_vectors(tiny_model, [1], grouped=other, cache_root=tmp_path)
    with pytest.raises(ValueError, match="outside"):
        actadd_vectors(tiny_model, [99], grouped=grouped, cache_root=tmp_path)


def test_harness_refuses_duplicate_names_and_own_decoders_on_ready_prompts(setup):
    from spare_tl.stages.harness import Condition, answer_conditions, answer_prompts

    demos = evaluation_demonstrations(HELD_OUT, POOL, 2, seed=0)
    with pytest.raises(ValueError, match="unique"):
        answer_conditions(
            setup.model,
            Questions(HELD_OUT, demos),
            [Condition("a", NoSteering()), Condition("a", NoSteering())],
            progress=False,
        )
    with pytest.raises(ValueError, match="decode on their own"):
        answer_prompts(setup.model, ["x"], [Condition("cad", CAD(0.5), "context")])


def test_evaluation_reports_intervals_and_paired_tests(setup):
    result = evaluate_method(
        setup.model, setup.make("spare", {}), HELD_OUT, POOL, config=CONFIG, progress=False
    ).to_json()
    base = result["no_steering"]["intervals"]
    assert "vs_no_steering" not in base["EM_C"]
    for cond in ("steer_to_context", "steer_to_memory"):
        entry = result[cond]["intervals"]["EM_M"]
        ci = entry["ci95"]
        assert ci["low"] <= result[cond]["EM_M"] <= ci["high"]
        test = entry["vs_no_steering"]["paired_bootstrap"]
        assert test["difference"] == pytest.approx(
            result[cond]["EM_M"] - result["no_steering"]["EM_M"]
        )
        assert 0 < test["p_value"] <= 1
    method = result["method"]
    assert method["time_relative_to_no_steering"]["no_steering"] == pytest.approx(1.0)
    assert method["shared_prefix_seconds_per_item"] > 0


def test_closed_book_is_cad_at_minus_one(setup):
    """CAD with α = −1 decodes log p(y | x): the closed-book reference's answers exactly."""
    from spare_tl.methods.baselines import ClosedBook
    from spare_tl.stages.harness import Condition, answer_conditions

    questions = Questions(HELD_OUT, evaluation_demonstrations(HELD_OUT, POOL, 2, seed=0))
    answers = answer_conditions(
        setup.model,
        questions,
        [Condition("closed", ClosedBook(), "memory"), Condition("cad", CAD(1.0), "memory")],
        max_new_tokens=5,
        progress=False,
    )
    assert answers["closed"] == answers["cad"]
    # and so does CAD's own two-pass decoding at α = −1 (what the shortcut stands for)
    two_pass = cad_generate(
        setup.model,
        questions.prompts(),
        ClosedBook().prompts(questions, "memory"),
        -1.0,
        max_new_tokens=5,
        progress=False,
    )
    assert two_pass == answers["cad"]
    assert not CAD(1.0).edits("memory") and CAD(1.0).edits("context")
    assert not CAD(0.0).edits("context") and CAD(2.0).edits("memory")
    prompts = ClosedBook().prompts(questions, "memory")
    assert all("context: " + it.sub_context not in p for it, p in zip(HELD_OUT, prompts))
    assert ClosedBook().prompts(questions, None) == questions.prompts()
