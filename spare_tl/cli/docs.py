"""``spare-tl docs``: regenerate ``docs/results.md`` from the saved JSON, nothing else.

Every number on that page is read from ``cache_data/<model>/`` (held-out results, baselines,
development sweep, steerability scan, conflict probes); each section names the command that
regenerates its JSON. Missing parts are listed, not invented. The README only links here.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spare_tl import cache
from spare_tl.embedded import EMBEDDED_MODEL as DEFAULT_MODEL
from spare_tl.studies.results import CASES
from spare_tl.viz.tables import Table, baselines_markdown, layer_range, pm

COMMANDS = {
    "results": "spare-tl results --n-items 200 --seeds 0 1 2 3 4 --cases doo dso dss",
    "sweep": "spare-tl sweep configs/smollm2.toml ... --write-features",
    "probes": "spare-tl probes --layers 6-20 --seeds 0 1 2 3 4 --n-items 40 "
    "--probe-items 500 --eval-seeds 0 1 2",
}


def _cell(d: dict[str, Any], key: str) -> str:
    """``mean ± std [low, high]``: over seeds, and the 95 % bootstrap interval over questions
    (when the result has intervals)."""
    text = pm(d[key], d[key + "_std"])
    ci = d.get("intervals", {}).get(key, {}).get("ci95")
    return text + (f" [{ci['low']:.1f}, {ci['high']:.1f}]" if ci else "")


def _versus(d: dict[str, Any], key: str) -> str:
    """Steered minus no steering in ``key`` (points) with the paired bootstrap p-value."""
    test = d.get("intervals", {}).get(key, {}).get("vs_no_steering")
    if not test:
        return "–"
    pb = test["paired_bootstrap"]
    p = pb["p_value"]  # resolution 1 / resamples (2,000)
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
    return f"{pb['difference']:+.1f} [{pb['low']:+.1f}, {pb['high']:+.1f}], {shown}"


TARGET = {"steer_to_context": "EM_C", "steer_to_memory": "EM_M"}
RESULTS_HEADER = (
    "demonstrations",
    "condition",
    "EM_C (context answer)",
    "EM_M (memory answer)",
    "neither",
    "contains C / M",
    "steered − none, target metric",
)


def _contains(d: dict[str, Any]) -> str:
    if d.get("contains_C") is None:
        return "–"
    return f"{d['contains_C']:.1f} / {d['contains_M']:.1f}"


def protocol_text(result: dict[str, Any]) -> str:
    """How the saved result drew its demonstrations and which relations its questions span."""
    drawn = result.get("protocol", {}).get("demonstrations")
    how = {
        "per_seed": "one set of pool demonstrations per seed, shown before every question "
        "(the paper's protocol)",
        "per_item": "each question its own seeded pool demonstrations",
        None: "each question its own seeded pool demonstrations (recorded before the "
        "protocol was; spare-tl's protocol then)",
    }[drawn]
    relations = result.get("relations")
    spread = (
        f"; the questions span {len(relations)} relations "
        f"({', '.join(f'{r} {n}' for r, n in relations.items())})"
        if relations
        else ""
    )
    return f"Demonstrations: {how}{spread}."


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per (demonstrations, condition), from the saved results JSON."""
    body = [
        [
            demo_type,
            cond.replace("_", " "),
            _cell(data[cond], "EM_C"),
            _cell(data[cond], "EM_M"),
            f"{data[cond]['neither']:.1f}",
            _contains(data[cond]),
            _versus(data[cond], TARGET[cond]) if cond in TARGET else "–",
        ]
        for demo_type, data in results.items()
        for cond in CASES[demo_type]
    ]
    lines = [Table(RESULTS_HEADER, body, left={0, 1}).markdown()]
    first = next(iter(results.values()))
    feats = first.get("features", {})
    mem = feats.get("to_memory")
    if mem:
        setting = (
            f"to context layers {feats.get('layers')}, K = {feats.get('proportion')}, "
            f"α = {feats.get('edit_strength')}; to memory layers {mem.get('layers')}, "
            f"K = {mem.get('proportion')}, α = {mem.get('edit_strength')}."
        )
    else:
        a_mem = feats.get("edit_strength_to_memory") or feats.get("edit_strength")
        setting = (
            f"layers {feats.get('layers')}, K = {feats.get('proportion')}, "
            f"α = {feats.get('edit_strength')} to context / {a_mem} to memory."
        )
    lines += [
        "",
        f"{first['model']}, built-in dataset: {first['n_items']} held-out memorised questions, "
        f"seeds {first['seeds']}; mean ± std over seeds (%), [95 % bootstrap interval over "
        "questions]; last column: steered minus no steering in the direction's target (EM_C "
        "to context, EM_M to memory), points, with its paired-bootstrap interval and p-value "
        f"(questions resampled jointly). Contains: answers that hold C (or M) as whole "
        "words without matching exactly, beside the exact matches (a wrapped answer is a "
        f"broken format, not a wrong fact). Features: {setting}",
        "",
        protocol_text(first),
    ]
    if "transitions" in results.get("doo", {}):
        t = results["doo"]["transitions"]
        parts = [f"{k} {v['mean']:.1f}" for k, v in t.items()]
        lines.append(f"Transitions with doo demonstrations (%): {', '.join(parts)}.")
    return "\n".join(lines)


def relation_table(result: dict[str, Any]) -> str:
    """Markdown table of one case's per-relation EM_C / EM_M by condition."""
    per = result.get("per_relation", {})
    conds = [c for c in ("no_steering", "steer_to_context", "steer_to_memory") if c in result]
    header = ["relation", "n", *(f"{c.replace('_', ' ')} EM_C / EM_M" for c in conds)]
    body = [
        [
            rel,
            next(iter(data.values()))["n"],
            *(f"{data[c]['EM_C']:.1f} / {data[c]['EM_M']:.1f}" for c in conds),
        ]
        for rel, data in per.items()
    ]
    return Table(header, body, left={0}).markdown()


def _saved_json(directory: Path, names: Sequence[str]) -> dict[str, Any]:
    """``<name>.json`` of ``directory``, read, for every name that has one."""
    paths = {name: directory / f"{name}.json" for name in names}
    return {name: cache.read_json(p) for name, p in paths.items() if p.is_file()}


def _results_section(directory: Path, missing: list[str]) -> list[str]:
    results = _saved_json(directory, CASES)
    if not results:
        missing.append(f"held-out results: no <case>.json in {directory}")
        return []
    out = ["## Held-out results", "", results_table(results), ""]
    if "doo" in results:
        out += ["Per relation, doo demonstrations (% of rows over all seeds):", ""]
        out += [relation_table(results["doo"]), ""]
    per_item = _saved_json(directory, [f"{case}-per_item" for case in CASES])
    if per_item:
        out += [
            "Demonstrations drawn once per seed (the paper's protocol, above) or per question "
            "(`--demonstrations per_item`), the same questions and seeds: mean ± std over "
            "seeds (%).",
            "",
            protocol_comparison(results, per_item),
            "",
        ]
    out += [f"Regenerate the JSON: `{COMMANDS['results']}`.", ""]
    return out


def protocol_comparison(
    per_seed: Mapping[str, Mapping[str, Any]], per_item: Mapping[str, Mapping[str, Any]]
) -> str:
    """The target metric of every condition under both demonstration protocols."""
    body = []
    for name, item in per_item.items():
        case = name.removesuffix("-per_item")
        seed = per_seed.get(case)
        for cond in CASES[case]:
            for key in ("EM_C", "EM_M"):
                if cond in TARGET and TARGET[cond] != key:
                    continue
                one = seed[cond] if seed and cond in seed else None
                body.append(
                    [
                        case,
                        cond.replace("_", " "),
                        key,
                        pm(one[key], one[f"{key}_std"]) if one else "–",
                        pm(item[cond][key], item[cond][f"{key}_std"]),
                    ]
                )
    header = ("demonstrations", "condition", "metric", "one set per seed", "per question")
    return Table(header, body, left={0, 1, 2}).markdown()


def _baselines_section(directory: Path, missing: list[str]) -> list[str]:
    from spare_tl.studies.baseline_setup import METHODS

    results = _saved_json(directory, METHODS)
    if not results:
        missing.append(f"baselines: no <method>.json in {directory}")
        return []
    first = next(iter(results.values()))
    seeds = " ".join(map(str, first["seeds"]))
    command = (
        f"spare-tl baselines table --methods {' '.join(results)} "
        f"--n-items {first['n_items']} --seeds {seeds}"
    )
    out = ["## Against the baselines", ""]
    stale = _stale_spare(results.get("spare"), directory.parent / "functional_features")
    if stale:
        out += [f"**Out of date:** {stale}", ""]
    return [
        *out,
        baselines_markdown(results),  # with its caption: questions, seeds, settings, time
        "",
        f"Regenerate the JSON: `{command}`.",
        "",
    ]


def _stale_spare(spare: Mapping[str, Any] | None, features_dir: Path) -> str | None:
    """Why the table's SpARE row is not the committed feature set, or None when it is."""
    if spare is None or not (features_dir / "features.json").is_file():
        return None
    from spare_tl.features import FunctionalFeatures
    from spare_tl.stages.evaluation import features_summary

    now = features_summary(FunctionalFeatures.load(features_dir))
    if spare.get("features") == now:
        return None
    return (
        "this table was made with an earlier feature set (SpARE's row: "
        f"layers {spare.get('features', {}).get('layers')}); the committed set edits layers "
        f"{now['layers']} to context and {now.get('to_memory', now)['layers']} to memory. "
        "Rerun the command below to compare them."
    )


def _weights_text(dtype: str | None, where: str) -> str:
    """The sentence naming the dtype a study ran the model in (or saying it was not recorded)."""
    if not dtype:
        return f" The model's dtype is not recorded in {where}."
    return f" Model weights in {dtype.removeprefix('torch.')}."


def _sweep_section(path: Path, missing: list[str]) -> list[str]:
    from spare_tl.stages.scan import scan_of_questions
    from spare_tl.stages.sweep import best_settings, oracle_shares

    if not path.is_file():
        missing.append(f"development sweep: no {path}")
        return []
    data = cache.read_json(path)
    config = data.get("config", {})
    records = data.get("records", [])
    base = next((r for r in records if r["direction"] == "none"), None)
    lines = ["## Development sweep", ""]
    if base:
        cap = config.get("max_neither_rise")
        lines.append(
            f"{config.get('dev_set', 'development questions')}. No steering: EM_C "
            f"{base['EM_C']:.1f}, EM_M {base['EM_M']:.1f}, neither {base['neither']:.1f} "
            f"(n = {base['n']}); {len(records) - 1} settings (site, layer window, K, α, "
            "direction)"
            + (f"; a chosen setting breaks at most {cap:g} points more answers." if cap else ".")
            + _weights_text(config.get("dtype"), "sweep.json")
        )
        lines.append("")
    # the shares against the saved scan of the same questions (else those saved with the sweep)
    scan = scan_of_questions(path.parent.parent / "scan", config.get("items"))
    best_now = best_settings(records, config.get("max_neither_rise"))
    oracle = oracle_shares(records, best_now, scan) if scan else data.get("oracle") or {}
    for direction, best in data.get("best", {}).items():
        key = "EM_C" if direction == "context" else "EM_M"
        line = (
            f"- best to {direction}: {best.get('site') or 'resid_post'} layers "
            f"{best['layers']}, K = {best['proportion']}, α = {best['edit_strength']}: "
            f"{key} {best[key]:.1f}, neither {best['neither']:.1f}"
        )
        o = oracle.get(direction)
        if o:
            share = (
                f"**{100 * o['share']:.0f} % of the oracle's gain**"
                if o["share"] is not None
                else "no share: the donor gains too little there to be a ceiling"
            )
            line += (
                f"; the scan's oracle at the same site and layers reaches {key} "
                f"{o['oracle_EM']:.1f} ({o['oracle_gain']:+.1f}), SpARE {o['spare_gain']:+.1f}: "
                f"{share}"
            )
        lines.append(line)
    command = config.get("command", COMMANDS["sweep"])
    return [*lines, "", f"Saved at `{path.name}`; regenerate: `{command}`.", ""]


def _scan_section(directory: Path, missing: list[str]) -> list[str]:
    from spare_tl.stages.scan import ScanResult, scan_table

    if not (directory / "scan.json").is_file():
        missing.append(f"steerability scan: no scan.json in {directory}")
        return []
    scan = ScanResult.load(directory)
    dtype = (cache.read_stage_config(directory) or {}).get("config", {}).get("dtype")
    ran_in = _weights_text(dtype, "the scan's config.json")
    lines = [
        "## Steerability scan",
        "",
        "EM on development questions after replacing the activation at the last prompt "
        "position of one layer and site with a donor run's (M<-site: EM_M with the closed-book "
        "memory donor; C<-site: EM_C with the dss context donor). The oracle for any edit "
        f"at that place.{ran_in}",
        "",
        "```",
        scan_table(scan),
        "```",
        "",
    ]
    for direction in ("memory", "context"):
        lines.append(
            f"- steerable to {direction} (residual patch reaching at least half the best "
            f"gain): layers {scan.steerable_layers(direction)}"
        )
    donors = ", ".join(
        f"{d} donor EM_C {v['EM_C']:.1f} / EM_M {v['EM_M']:.1f}" for d, v in scan.donors.items()
    )
    lines += [
        f"- what the donor runs answer themselves: {donors}",
        "",
        "![Steerability scan beside the layer-wise mutual information](img/steerability_scan.png)",
        "",
        "(The picture is `spare_tl.viz.steerability_scan(scan, statistics)`, as in "
        "`spare-tl report`; shaded: the layers the committed features edit.)",
    ]
    return [*lines, "", f"Regenerate: `{_scan_command(scan, dtype)}`.", ""]


def _layers_argument(layers: Sequence[int]) -> str:
    """``10-23`` for consecutive layers (:func:`~spare_tl.viz.tables.layer_range`), else the
    layers one by one, as ``--layers`` takes them."""
    text = layer_range(list(layers))
    return " ".join(map(str, layers)) if text.startswith("[") else text


def _scan_command(scan: Any, dtype: str | None) -> str:
    """The command that made the saved scan, from its own config."""
    config = scan.config
    command = (
        f"spare-tl scan configs/smollm2.toml --n-items {scan.n_items} "
        f"--sites {' '.join(config.get('sites', []))} --layers {_layers_argument(scan.layers())}"
    )
    if config.get("seed"):
        command += f" --seed {config['seed']}"
    return command + (f" --dtype {dtype.removeprefix('torch.')}" if dtype else "")


def _probes_section(directory: Path, missing: list[str]) -> list[str]:
    from spare_tl.cli.probes import probes_table
    from spare_tl.studies.saved import load_probe_study

    study = load_probe_study(directory, missing)
    if study is None or study.resid is None:
        return []
    table = probes_table(
        study.resid,
        study.sae,
        probe=study.probe,
        latents=None,
        conditional=study.conditional,
    )
    return ["## Detecting the conflict", "", table, "", f"Regenerate: `{COMMANDS['probes']}`.", ""]


def _feature_effects_section(model_dir: Path, missing: list[str]) -> list[str]:
    from spare_tl.stages.feature_effects import STAGE, read_feature_effects
    from spare_tl.stages.feature_examples import STAGE as EXAMPLES
    from spare_tl.stages.feature_examples import FeatureExamples

    directory = model_dir / STAGE
    if not (directory / cache.CONFIG).is_file():
        missing.append(f"causal effect of each feature: nothing in {directory}")
        return []
    effects = read_feature_effects(directory)
    examples = None
    if (model_dir / EXAMPLES / cache.CONFIG).is_file():
        examples = FeatureExamples.load(model_dir / EXAMPLES)
    stored = (cache.read_stage_config(directory) or {}).get("config", {})
    protocol = stored.get("evaluation", {})

    def tokens(row: Mapping[str, Any]) -> str:
        if examples is None or row["hook_name"] not in examples.by_hook:
            return ""
        saved = examples.by_hook[row["hook_name"]].logit_tokens.get(row["latent"], {})
        shown = [t["token"].strip() or repr(t["token"]) for t in saved.get("promoted", [])[:4]]
        return ", ".join(f"`{text}`".replace("|", "\\|") for text in shown)

    lines = [
        "## Which features carry the steering",
        "",
        f"Each functional feature's causal effect on {effects.n_items} development questions "
        f"(seeds {effects.seeds}, {protocol.get('n_shots', 3)} {protocol.get('demo_type', 'doo')} "
        f"demonstrations, answers of at most {protocol.get('max_new_tokens', 12)} tokens): the "
        "SpARE edit restricted to that one feature (same α, removed or added as in the full "
        "edit), and the full set without it. Gain: the target share (EM_C steering to "
        f"context, EM_M to memory) minus no steering, points; {effects.n_items} questions "
        f"move in steps of {100 / effects.n_items:.3g} points, so a difference of one step "
        "is noise.",
        "",
    ]
    for d, block in effects.directions.items():
        t = block["target"]
        share = block.get("top_share_of_full_gain")
        lines += [
            f"### Steering to {d} (α = {block['edit_strength']:g})",
            "",
            f"No steering {t} {block['no_steering'][t]:.1f}, full set "
            f"{block['full'][t]:.1f}; the top 3 features alone ({', '.join(block['top'])}) "
            f"{block['top_shares'][t]:.1f}"
            + (f", {100 * share:.0f} % of the full set's gain." if share is not None else "."),
            "",
            f"| layer:latent | role | edit | {t} alone | gain | neither alone | full set without it | promotes |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for r in block["features"][:8]:
            lines.append(
                f"| {r['layer']}:{r['latent']} | {r['role']} | {r['edit']} | {r['only'][t]:.1f} "
                f"| {r['gain']:+.1f} | {r['only']['neither']:.1f} | "
                f"{r['without'][t]:.1f} | {tokens(r)} |"
            )
        lines.append("")
    lines += [
        "Cards for every feature (examples, histograms, logit lens): `spare-tl report`, "
        "`spare-tl features show LAYER:LATENT`.",
        "",
        "![One feature card](img/feature_card.png)",
        "",
        f"Regenerate: `spare-tl features effects --n-items {effects.n_items} "
        f"--seeds {' '.join(map(str, effects.seeds))} "
        f"--max-new-tokens {protocol.get('max_new_tokens', 12)}`.",
        "",
    ]
    return lines


def results_document(model_dir: Path) -> tuple[str, list[str]]:
    """The Markdown of ``docs/results.md`` and the parts that were missing."""
    model_dir = Path(model_dir)
    missing: list[str] = []
    lines = [
        "# Results",
        "",
        f"Generated by `spare-tl docs` from the JSON in `cache_data/{model_dir.name}/`; do "
        "not edit by hand. Every table says how many questions and seeds it rests on; the "
        "method is in [method.md](method.md), timings in [benchmarks.md](benchmarks.md).",
        "",
    ]
    lines += _results_section(model_dir / "results", missing)
    lines += _baselines_section(model_dir / "baselines", missing)
    lines += _scan_section(model_dir / "scan", missing)
    lines += _sweep_section(model_dir / "sweep" / "sweep.json", missing)
    lines += _feature_effects_section(model_dir, missing)
    lines += _probes_section(model_dir / "probes", missing)
    if missing:
        lines += ["## Not available", "", *[f"- {m}" for m in missing], ""]
    return "\n".join(lines), missing


def headline(model_dir: Path) -> str | None:
    """One status line with the doo case's steered numbers and their intervals."""
    path = Path(model_dir) / "results" / "doo.json"
    if not path.is_file():
        return None
    data: Mapping[str, Any] = cache.read_json(path)

    def cell(cond: str, key: str) -> str:
        d = data[cond]
        ci = d.get("intervals", {}).get(key, {}).get("ci95")
        return f"{d[key]:.1f} %" + (f" [{ci['low']:.1f}, {ci['high']:.1f}]" if ci else "")

    return (
        f"EM_C {cell('no_steering', 'EM_C')} → {cell('steer_to_context', 'EM_C')} steering to "
        f"context; EM_M {cell('no_steering', 'EM_M')} → {cell('steer_to_memory', 'EM_M')} "
        f"steering to memory ({data['n_items']} held-out questions × {len(data['seeds'])} "
        "seeds, doo demonstrations, 95 % intervals over questions)"
    )


def draw_scan_figure(model: str, png: Path) -> str:
    """Redraw the results page's picture (the saved scan beside the per-layer mutual
    information, the committed features' layers shaded) as a PNG with headless Chromium;
    returns what was done."""
    from spare_tl.viz import find_chromium, screenshot, steerability_scan
    from spare_tl.viz.report_inputs import load_report_inputs

    if find_chromium() is None:
        return f"{png} not redrawn: no headless Chromium (apt-get install chromium)"
    inputs = load_report_inputs(model=model)
    if inputs.scan is None:
        return f"{png} not redrawn: no saved steerability scan"
    layers = inputs.features.all_layers if inputs.features is not None else ()
    figure = steerability_scan(inputs.scan, inputs.statistics or None, highlight_layers=layers)
    with tempfile.TemporaryDirectory(prefix="spare-tl-docs-") as tmp:
        html = Path(tmp) / "scan.html"
        figure.write_html(html, include_plotlyjs=True, config={"displayModeBar": False})
        shot = screenshot(html, Path(tmp) / "scan.png")
        cache.write_file_atomic(png, lambda path: shutil.copyfile(shot, path))
    return f"redrew {png}"


def draw_card_figure(model: str, png: Path) -> str:
    """Screenshot the card of the feature with the largest causal effect steering to context
    (as the report draws it, opened) as a PNG with headless Chromium; returns what was done."""
    from plotly.offline import get_plotlyjs

    from spare_tl.viz import find_chromium, functional_feature_cards, screenshot
    from spare_tl.viz.report_inputs import load_report_inputs
    from spare_tl.viz.report_page import _CSS

    if find_chromium() is None:
        return f"{png} not redrawn: no headless Chromium (apt-get install chromium)"
    inputs = load_report_inputs(model=model)
    if inputs.features is None or inputs.examples is None or inputs.effects is None:
        return f"{png} not redrawn: no saved feature examples or causal effects"
    cards = functional_feature_cards(
        inputs.features,
        statistics=inputs.statistics,
        examples=inputs.examples,
        effects=inputs.effects,
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{_CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>"
        f"{cards[0].to_html(open_=True, div_id='card')}</body></html>"
    )
    with tempfile.TemporaryDirectory(prefix="spare-tl-docs-") as tmp:
        html = Path(tmp) / "card.html"
        html.write_text(page, encoding="utf-8")
        shot = screenshot(html, Path(tmp) / "card.png", width=1150, height=1100)
        cache.write_file_atomic(png, lambda path: shutil.copyfile(shot, path))
    return f"redrew {png}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("docs", help="regenerate docs/results.md from the saved JSON")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder under the cache root")
    p.add_argument("--output", default="docs/results.md", help="where to write the page")
    p.add_argument(
        "--benchmarks",
        default="docs/benchmarks.md",
        help="where to write the benchmarks page (from cache_data/<model>/benchmarks/*.json); "
        "'-' to skip it",
    )
    p.add_argument(
        "--figures",
        action="store_true",
        help="also redraw the page's pictures (img/steerability_scan.png, img/feature_card.png)",
    )
    p.set_defaults(func=_docs_command)


def _docs_command(args: argparse.Namespace) -> int:
    from spare_tl import checks

    output = checks.output_file(args.output)
    model_dir = cache.default_cache_root() / cache.model_slug(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no cached results for {args.model} in {model_dir}")
    text, missing = results_document(model_dir)
    cache.write_text_atomic(output, text)
    print(f"wrote {output} ({len(text.splitlines())} lines)")
    if args.benchmarks != "-":
        from spare_tl.cli.docs_benchmarks import benchmarks_document

        bench = checks.output_file(args.benchmarks)
        page = benchmarks_document(model_dir / "benchmarks")
        cache.write_text_atomic(bench, page)
        print(f"wrote {bench} ({len(page.splitlines())} lines)")
    if args.figures:
        print(draw_scan_figure(args.model, output.parent / "img" / "steerability_scan.png"))
        print(draw_card_figure(args.model, output.parent / "img" / "feature_card.png"))
    for m in missing:
        print(f"missing: {m}")
    line = headline(model_dir)
    if line:
        print(f"status: {line}")
    return 0
