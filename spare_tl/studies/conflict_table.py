"""How the model behaves under knowledge conflict, per relation and demonstration type.

For memorised evaluation items (never pool questions), the conflict prompt is answered with
``n_shots`` pool demonstrations of each type (``dss``, ``dso``, ``doo``); the table gives the
share answered from the context (C), from memory (M) or neither.
``spare-tl conflict-table --output docs/conflict_behaviour.md`` regenerates it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from spare_tl.data.prompts import conflict_prompt, sample_demonstrations
from spare_tl.data.schema import ConflictItem
from spare_tl.data.scoring import behaviour_label
from spare_tl.generation import greedy_generate

DEMO_TYPES = ("dss", "dso", "doo")


def conflict_behaviour(
    model,
    items: list[ConflictItem],
    pool: list[ConflictItem],
    *,
    n_shots: int = 3,
    seed: int = 0,
    demo_types: tuple[str, ...] = DEMO_TYPES,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, float]]]:
    """relation (and "all") → demo type → {n, context, memory, neither} in percent."""
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for demo_type in demo_types:
        prompts = [
            conflict_prompt(
                it, sample_demonstrations(pool, n_shots, seed * 7919 + i, it), demo_type
            )
            for i, it in enumerate(items)
        ]
        answers = greedy_generate(
            model, prompts, batch_size=batch_size, progress=progress, desc=f"{demo_type} prompts"
        )
        for it, ans in zip(items, answers):
            label = behaviour_label(ans, it)
            counts[it.relation][demo_type][label] += 1
            counts["all"][demo_type][label] += 1
    table: dict[str, dict[str, dict[str, float]]] = {}
    for rel, per_type in counts.items():
        table[rel] = {}
        for demo_type, c in per_type.items():
            n = sum(c.values())
            table[rel][demo_type] = {
                "n": n,
                **{k: 100.0 * c[k] / n for k in ("context", "memory", "neither")},
            }
    return table


def to_markdown(
    table: dict[str, dict[str, dict[str, float]]],
    memorised: dict[str, tuple[int, int]],
    meta: dict[str, Any],
) -> str:
    lines = [
        "# The embedded model under knowledge conflict",
        "",
        f"Model `{meta['model']}`, built-in dataset `{meta['dataset']}`. Memorised set: closed-book "
        f"{meta['memorised_shots']}-shot greedy answers with exact match on M. Conflict prompts: "
        f"{meta['n_shots']} pool demonstrations of each type, seed {meta['seed']}, greedy ≤ 12 tokens; "
        "C = answer from the context (`sub_answer`), M = from memory (`org_answer`).",
        f"Regenerate: `{meta['command']}` ({meta['seconds']:.0f} s on this machine).",
        "",
        "## Memorised set per relation",
        "",
        "| relation | memorised | items | share |",
        "|---|---:|---:|---:|",
    ]
    for rel, (k, n) in sorted(memorised.items()):
        lines.append(f"| {rel} | {k} | {n} | {100 * k / max(n, 1):.0f} % |")
    total_k = sum(k for k, _ in memorised.values())
    total_n = sum(n for _, n in memorised.values())
    lines.append(
        f"| **all** | **{total_k}** | **{total_n}** | **{100 * total_k / max(total_n, 1):.0f} %** |"
    )
    lines += [
        "",
        "## Behaviour under conflict (% of prompts: C / M / neither)",
        "",
        "| relation | n | dss C / M / – | dso C / M / – | doo C / M / – |",
        "|---|---:|---|---|---|",
    ]
    order = sorted(r for r in table if r != "all") + ["all"]
    for rel in order:
        cells = []
        n = 0
        for t in DEMO_TYPES:
            d = table[rel].get(t)
            if d:
                n = d["n"]
                cells.append(f"{d['context']:.0f} / {d['memory']:.0f} / {d['neither']:.0f}")
            else:
                cells.append("–")
        name = f"**{rel}**" if rel == "all" else rel
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
