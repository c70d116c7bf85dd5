"""One rank of a sharded evaluation, for tests/test_distributed.py (run by ``torchrun`` or
as a plain script for one process).

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py --out DIR [--embedded]

Tiny model (default): a random tiny Llama, random functional features and SAEs, synthetic
conflict items, 3 seeds. ``--embedded``: the embedded model with its committed features and
SAEs on the first ``--items`` held-out questions, 2 seeds. With ``--direct FILE`` the
process also writes plain ``evaluate``'s result there (the reference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def tiny_setup(n_items: int):
    from spare_tl.methods.spare import resid_post_hook_name
    from spare_tl.testing import conflict_items, tiny_features, tiny_model, tiny_sae

    model = tiny_model(seed=0)
    saes = {layer: tiny_sae(resid_post_hook_name(layer), seed=layer) for layer in (1, 2)}
    features = tiny_features(scale=4.0)
    return model, features, saes, conflict_items(n_items), conflict_items(12, start=100)


MEM = dict(dataset_name="tiny", n_shots=2, min_shared=8, max_new_tokens=4)


def _scan_config():
    from spare_tl.stages.scan import ScanConfig

    return ScanConfig(layers=(0, 1, 2), sites=("resid_post", "attn_out"), max_new_tokens=4,
                      batch_size=4)  # fmt: skip


SCAN = _scan_config()


def _behaviours_config():
    from spare_tl.stages.behaviours import BehaviourConfig

    return BehaviourConfig(shots=(2,), seeds=(0, 1), demo_types=("doo", "dss"),
                           max_new_tokens=4, batch_size=4)  # fmt: skip


BEHAVIOURS = _behaviours_config()


def relabelled(grouped):
    """The grouped prompts labelled context / memory in turn (a random tiny model answers
    neither), so that the activations stage has both groups."""
    from spare_tl.stages.behaviours import GroupedPrompts

    records = [{**r, "label": ("context", "memory")[i % 2]} for i, r in enumerate(grouped.records)]
    return GroupedPrompts(grouped.model_name, records, grouped.config)


def sweep_grid():
    from spare_tl.stages.sweep import grid

    return grid({"resid_post": [[1], [1, 2]]}, [0.2], [1.0, 4.0])


def own_answers(model, items, pool):
    """``items``, every other one with the tiny model's own unsteered answer as its memory
    answer, so that the sweep's shares move with steering."""
    from dataclasses import replace

    from spare_tl.stages.evaluation import evaluation_questions
    from spare_tl.stages.harness import Condition, NoSteering, answer_conditions

    questions = evaluation_questions(items, pool, 2, 0, "doo")
    none = [Condition("none", NoSteering())]
    answers = answer_conditions(model, questions, none, batch_size=4, progress=False)["none"]
    return [
        replace(it, org_answer=(a.strip() or "?",)) if i % 2 == 0 else it
        for i, (it, a) in enumerate(zip(items, answers))
    ]


def split_stages(model, saes, items, pool, root: Path) -> None:
    """Grouping, activations and the sweep split across ranks, under ``root``."""
    from spare_tl.stages.sharded_pipeline import (
        collect_activations_sharded,
        group_prompts_sharded,
        sweep_sharded,
    )
    from spare_tl.stages.statistics import feature_statistics

    grouped = group_prompts_sharded(model, pool, BEHAVIOURS, cache_root=root, batches_per_unit=1)
    acts = collect_activations_sharded(
        model, relabelled(grouped), [1, 2], batch_size=4, cache_root=root, batches_per_unit=2
    )
    stats = feature_statistics(model, acts, saes, use_cache=False, progress=False)
    dev = own_answers(model, items, pool)
    sweep_sharded(model, stats, saes, dev, pool, sweep_grid(), root / "sweep_records",
                  n_shots=2, batch_size=4, settings_per_unit=3)  # fmt: skip


def MEMORISED_ITEMS():  # noqa: N802 - a constant, built on demand
    from spare_tl.testing import conflict_items

    return conflict_items(40, start=200)


def embedded_setup(n_items: int):
    from spare_tl.embedded import load_steering_setup
    from spare_tl.stages.memorised import memorised_split

    model, features, saes = load_steering_setup()
    split = memorised_split(model, features, "builtin", progress=False)
    return model, features, saes, split.test[:n_items], split.pool


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--embedded", action="store_true")
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--direct", default=None)
    parser.add_argument("--log", default=None, help="append each computed seed here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    from spare_tl import distributed
    from spare_tl.stages.evaluation import EvaluationConfig, evaluate
    from spare_tl.stages.sharded import evaluate_sharded

    r = distributed.init()
    setup = embedded_setup if args.embedded else tiny_setup
    model, features, saes, items, pool = setup(args.items)
    seeds = (0, 1) if args.embedded else (0, 1, 2)
    config = EvaluationConfig(seeds=seeds, max_new_tokens=6 if not args.embedded else 12)
    if args.log:
        import spare_tl.stages.sharded as sharded

        plain = sharded.evaluate

        def logged(*a, **k):
            with open(f"{args.log}.rank{r.rank}", "a") as f:
                f.write(f"{k['config'].seeds[0]}\n")
            return plain(*a, **k)

        sharded.evaluate = logged
    result = evaluate_sharded(
        model,
        items,
        pool,
        Path(args.out),
        features=features,
        saes=saes,
        config=config,
        progress=False,
    )
    if not args.embedded:  # the memorised set of 40 synthetic questions, under OUT-mem/
        from spare_tl.stages.sharded import find_memorised_sharded

        find_memorised_sharded(model, MEMORISED_ITEMS(), cache_root=Path(args.out + "-mem"), **MEM)
        # the steerability scan, its layers split across ranks, under OUT-scan/
        from spare_tl.stages.sharded import scan_sharded

        scan_sharded(model, items, pool, SCAN, root=Path(args.out + "-scan"), progress=False)
        # grouping, activations and the sweep, under OUT-pipe/
        split_stages(model, saes, items, pool, Path(args.out + "-pipe"))
    if r.is_main:
        print(json.dumps({"rank": r.rank, "world": r.world_size, "n": len(result.predictions)}))
    if args.direct and r.is_main:
        direct = evaluate(
            model, items, pool, features=features, saes=saes, config=config, progress=False
        )
        Path(args.direct).write_text(json.dumps(direct.to_json(), indent=2) + "\n")
    distributed.finish()


if __name__ == "__main__":
    main()
