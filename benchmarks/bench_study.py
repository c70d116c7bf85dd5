"""The study targets of issue 29, as ratios and seconds, against this CPU's FLOP limit.

    python benchmarks/bench_study.py [--json cache_data/smollm2-135m-instruct/benchmarks/study.json]

Reads the wall time each study recorded when it ran (``spare-tl results`` -> results/doo.json,
``spare-tl baselines table`` -> baselines/<method>.json, ``spare-tl scan`` -> scan/scan.json)
and sets it beside:

- its target on 2 CPU cores (doo 200 x 5 x 3 <= 300 s; the baselines table <= 900 s; the
  scan of 128 questions <= 300 s; CAD <= 1.3 x no steering);
- the **FLOP limit**: the forward FLOPs the study cannot avoid (2 x the model's matrix
  parameters per token computed: each seed's demonstration prefix once, each item's own
  prompt tokens once per distinct prompt, each answer's tokens once per distinct
  computation, CAD's twice) divided by this CPU's measured fp32 matrix-multiply rate. Tokens are counted from
  the saved prompts and predictions; the scan's donor runs' answers are not saved (nor, before
  2026-12-04, its conditions'), so those decode tokens use the doo study's mean answer length
  (marked as an estimate).

The matmul rate is measured here, now; the study times were measured when the studies ran
(their JSON names the machine): run both on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics as st
import time
from pathlib import Path

import torch

from spare_tl import cache
from spare_tl.data.prompts import conflict_prompt
from spare_tl.embedded import DEFAULT_FEATURES, DEFAULT_SAES, load_steering_setup
from spare_tl.generation import _tokenize
from spare_tl.hardware import describe
from spare_tl.methods.baselines import prompt_without_context
from spare_tl.stages.evaluation import evaluation_demonstrations
from spare_tl.stages.memorised import memorised_split

TARGETS = {"doo_study": 300.0, "baselines_table": 900.0, "scan": 300.0, "cad_ratio": 1.3}


def matmul_flops(seconds: float = 3.0, n: int = 1024) -> float:
    """This CPU's fp32 matrix-multiply rate (FLOP/s) on [n, n] @ [n, 4n], best of repeats."""
    a, b = torch.randn(n, n), torch.randn(n, 4 * n)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n * n * 4 * n / (time.perf_counter() - start))
    return best


def matrix_parameters(model) -> int:
    """Parameters that cost 2 FLOPs per token (every weight matrix; the embedding is a lookup,
    the unembedding counts once per token whose logits are needed)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n)


def answer_tokens(model, predictions: list[str]) -> int:
    """Tokens decoded for these answers (each answer's tokens plus its stop token, <= 12)."""
    ids = model.tokenizer(list(predictions), add_special_tokens=False)["input_ids"]
    return sum(min(len(x) + 1, 12) for x in ids)


def prompt_tokens(model, prompts: list[str], demonstrations_shared: bool) -> int:
    """Prompt tokens computed: the shared prefix once, then each prompt's own tokens."""
    from os.path import commonprefix

    tokens = _tokenize(model, prompts)
    shared = len(commonprefix(tokens)) if demonstrations_shared else 0
    return shared + sum(len(t) - shared for t in tokens)


def _doo(items, demos):
    return [conflict_prompt(it, d, "doo") for it, d in zip(items, demos)]


def _closed(items, demos):
    return [prompt_without_context(it, d, "doo") for it, d in zip(items, demos)]


def _icl(demo_type):
    return lambda items, demos: [conflict_prompt(it, d, demo_type) for it, d in zip(items, demos)]


#: the prompt versions each method of the table runs a prompt pass over: every method answers
#: in one harness call per seed, so the last-position methods (SpARE, ActAdd, task vectors)
#: share no steering's pass, and the closed-book row's two directions are one computation
VERSIONS = {
    "none": [_doo],
    "closed_book": [_closed],
    "spare": [],
    "actadd": [],
    "taskvec": [],
    "icl": [_icl("dss"), _icl("dso")],
}


def cad_plan(data: dict) -> tuple[list, list[str]]:
    """CAD's prompt versions and the conditions it decodes with two rows per token: both
    versions for each direction with α other than 0 and −1; at α = −1 it is the closed-book
    row's computation (answered once, counted there) and at α = 0 no steering's."""
    versions, conds = [], []
    for direction, hp in data["method"]["hyperparameters"].items():
        if hp.get("alpha") not in (0.0, -1.0):
            versions += [_doo, _closed]
            conds.append(f"steer_to_{direction}")
    return versions, conds


def study_tokens(model, split, result: dict, records: list[dict], conditions, versions) -> dict:
    """Forward tokens of one saved evaluation: a prompt pass per seed over each prompt version
    in ``versions`` and every answer of each condition in ``conditions``."""
    n = result["n_items"]
    items = split.test[:n]
    shared = result.get("protocol", {}).get("demonstrations") == "per_seed"
    prompt = decode = 0
    for seed in result["seeds"]:
        demos = evaluation_demonstrations(
            items, split.pool, 3, seed, "per_seed" if shared else "per_item"
        )
        prompt += sum(prompt_tokens(model, v(items, demos), shared) for v in versions)
        rows = [r for r in records if r["seed"] == seed]
        for cond in conditions:
            decode += answer_tokens(model, [r[f"{cond}.prediction"] for r in rows])
    return {"prompt_tokens": prompt, "decode_tokens": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, features, _ = load_steering_setup(DEFAULT_FEATURES, DEFAULT_SAES, dtype="float32")
    split = memorised_split(model, features, "builtin", progress=False)
    root = cache.stage_dir(model.cfg.model_name, "")
    rate = matmul_flops()
    per_token = 2 * matrix_parameters(model)
    out: dict = {
        "machine": describe(),
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/bench_study.py",
        "matmul_gflops": round(rate / 1e9, 1),
        "flops_per_token": per_token,
        "targets_seconds": TARGETS,
        "studies": {},
    }

    def limit(tokens: dict) -> float:
        return (tokens["prompt_tokens"] + tokens["decode_tokens"]) * per_token / rate

    doo_path = root / "results" / "doo.json"
    mean_answer = 4.0
    if doo_path.exists():
        doo = cache.read_json(doo_path)
        records = cache.read_jsonl(root / "results" / "doo-predictions.jsonl")
        conds = ["no_steering", "steer_to_context", "steer_to_memory"]
        tokens = study_tokens(model, split, doo, records, conds, [_doo])
        mean_answer = tokens["decode_tokens"] / (len(records) * len(conds))
        out["studies"]["doo_study"] = {
            "what": f"spare-tl results, doo, {doo['n_items']} questions x "
            f"{len(doo['seeds'])} seeds x 3 conditions",
            "seconds": doo.get("seconds"),
            "machine": doo.get("machine"),
            **tokens,
            "flop_limit_seconds": round(limit(tokens), 1),
        }
    table_path = root / "baselines" / "table.json"
    if table_path.exists():
        table = cache.read_json(table_path)
        methods = [r["method"] for r in table["rows"]]
        total, tokens_all, machine = 0.0, {"prompt_tokens": 0, "decode_tokens": 0}, None
        ratios = {}
        for name in methods:
            data = cache.read_json(root / "baselines" / f"{name}.json")
            records = cache.read_jsonl(root / "baselines" / f"{name}-predictions.jsonl")
            conds = [c for c in ("steer_to_context", "steer_to_memory") if c in data]
            versions = VERSIONS.get(name, [_doo])
            if name == "none":
                conds = ["no_steering"]
            if name == "closed_book":
                conds = conds[-1:]  # both directions answer the same prompts, once
            if name == "cad":
                versions, conds = cad_plan(data)
            tokens = study_tokens(model, split, data, records, conds, versions)
            if name == "cad":  # both prompt versions step every answer token
                tokens["decode_tokens"] *= 2
            for key in tokens_all:
                tokens_all[key] += tokens[key]
            total += data.get("seconds") or 0.0
            machine = machine or data.get("machine")
            ratios[name] = data["method"]["time_relative_to_no_steering"]
        cad = ratios.get("cad", {})
        steered = [v for k, v in cad.items() if k != "no_steering"]
        closed = any(r.get("memory_is_closed_book") for r in table["rows"])
        out["studies"]["baselines_table"] = {
            "what": f"spare-tl baselines table: {', '.join(methods)}",
            # the table's own wall time (steering vectors included unless cached) when recorded
            "seconds": table.get("seconds") or (round(total, 1) if total else None),
            "machine": table.get("machine") or machine,
            **tokens_all,
            "flop_limit_seconds": round(limit(tokens_all), 1),
        }
        cad_bench = root / "benchmarks" / "cad.json"
        if cad_bench.exists():  # both timed alone on the same questions (bench_cad.py)
            measured = cache.read_json(cad_bench)
            out["studies"]["cad_ratio"] = {
                "what": f"CAD / no steering, each alone on {measured['items']} test questions "
                "(benchmarks/bench_cad.py); in the table, where no steering decodes "
                "jointly with the last-position methods: "
                + (
                    ", ".join(
                        f"{k.removeprefix('steer_')} {v:.2f}"
                        for k, v in cad.items()
                        if k != "no_steering"
                    )
                    or "-"
                )
                + (" (α = −1 to memory: the closed-book prompt alone)" if closed else ""),
                "ratio": measured["cad_ratio"],
                "machine": measured.get("machine"),
                # the least the ratio can be at one FLOP rate: CAD's forward tokens over no
                # steering's (its context-free version and a second row per answer token)
                "flop_limit_ratio": measured.get("flop_ratio"),
            }
        elif steered:
            out["studies"]["cad_ratio"] = {
                "what": "CAD time per item / no steering's (mean of both directions)",
                "ratio": round(st.fmean(steered), 2),
            }
    scan_path = root / "scan" / "scan.json"
    if scan_path.exists():
        scan = cache.read_json(scan_path)
        n = scan["n_items"]
        items = split.development[:n]
        demos = evaluation_demonstrations(items, split.pool, 3, scan["config"]["seed"])
        prompts = [conflict_prompt(it, d, "doo") for it, d in zip(items, demos)]
        donors = [conflict_prompt(it, d, "dss") for it, d in zip(items, demos)]
        closed = [prompt_without_context(it, d, "doo") for it, d in zip(items, demos)]
        n_conditions = 1 + len(scan["rows"])
        tokens = {
            "prompt_tokens": sum(prompt_tokens(model, p, True) for p in (prompts, donors))
            + sum(map(len, _tokenize(model, closed))),
            "decode_tokens": round(n * (n_conditions + 2) * mean_answer),
        }
        saved = scan.get("answers")  # scans since 2026-12-04 keep every condition's answers
        if saved:  # the two donor runs' own answers are still estimated (not saved)
            tokens["decode_tokens"] = sum(answer_tokens(model, a) for a in saved.values())
            tokens["decode_tokens"] += round(n * 2 * mean_answer)
        out["studies"]["scan"] = {
            "what": f"spare-tl scan, {n} development questions, {n_conditions} conditions",
            "seconds": scan.get("seconds"),
            "machine": scan.get("machine"),
            **tokens,
            "decode_tokens_estimated": "donor answers only" if saved else True,
            "flop_limit_seconds": round(limit(tokens), 1),
        }
    for name, study in out["studies"].items():
        target = TARGETS[name]
        value = study.get("ratio", study.get("seconds"))
        study["target"] = target
        study["target_met"] = None if value is None else bool(value <= target)
        if study.get("seconds") and study.get("flop_limit_seconds"):
            study["times_flop_limit"] = round(study["seconds"] / study["flop_limit_seconds"], 1)
        print(name, json.dumps(study))
    print(f"machine: {out['machine']}; fp32 matmul {out['matmul_gflops']} GFLOP/s")
    if args.json:
        cache.write_json(Path(args.json), out)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
