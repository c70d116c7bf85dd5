"""Feature inspector: what one SAE latent does, and which latents drive context or memory.

For a latent at a layer, :func:`inspect_feature` gathers
- its **statistics**: mutual information (and its rank), expectation E, z̄_C, z̄_M, and
  whether it is a selected context or memory feature;
- its **top-activating grouped prompts** (from the SAE codes of the prompts);
- the **tokens its decoder direction promotes** (logit lens: ``W_dec[latent] @ W_U``).

:func:`layer_drivers` ranks, per layer, the context features and the memory features by
mutual information ("what drives context, what drives memory"). Both results render as
Markdown and HTML.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from spare_tl.features import LayerFeatures, select_functional_features

__all__ = [
    "FeatureReport",
    "LayerDrivers",
    "inspect_feature",
    "latent_statistics",
    "layer_drivers",
    "logit_lens",
    "top_activating_prompts",
]


def _clean_mi(mi: Tensor) -> Tensor:
    return mi.detach().cpu().double().nan_to_num(0.0).clamp_min(0.0)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id])


def _as_record(prompt: Any) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, Mapping):
        return dict(prompt)
    raise TypeError(f"a prompt is a string or a record with 'prompt', got {type(prompt).__name__}")


# --------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------


def top_activating_prompts(
    codes: Float[Tensor, "n d_sae"],
    prompts: Sequence[str] | Sequence[Mapping[str, Any]],
    latent: int,
    *,
    k: int = 10,
) -> list[dict[str, Any]]:
    """The ``k`` prompts on which ``latent`` is most active (only those with activation > 0).

    ``prompts`` are strings or grouped-prompt records (``prompt``, ``label``, ...), aligned
    with the rows of ``codes``. Returns ``{rank, index, activation, prompt, label?, ...}``.
    """
    if codes.ndim != 2 or codes.shape[0] != len(prompts):
        raise ValueError(f"codes {tuple(codes.shape)} do not match {len(prompts)} prompts")
    if not 0 <= latent < codes.shape[1]:
        raise ValueError(f"latent {latent} is outside the SAE's {codes.shape[1]} latents")
    values = codes[:, latent].detach().cpu().double()
    top = torch.topk(values, min(k, values.numel()))
    out = []
    for rank, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        if v <= 0:
            break
        rec = _as_record(prompts[i])
        keep = {
            key: rec[key] for key in ("label", "demo_type", "shots", "prediction") if key in rec
        }
        out.append(
            {"rank": rank, "index": i, "activation": v, "prompt": rec.get("prompt", ""), **keep}
        )
    return out


@torch.no_grad()
def logit_lens(
    model: Any, sae: Any, latent: int, *, k: int = 10
) -> dict[str, list[dict[str, Any]]]:
    """Tokens the latent's decoder direction promotes and suppresses through the unembedding.

    Scores are ``W_dec[latent] @ model.W_U`` (no final norm: a direction, not an activation).
    Returns ``{"promoted": [...], "suppressed": [...]}``, each ``{token_id, token, logit}``.
    """
    w_dec = sae.W_dec[latent].detach().float()
    w_u = model.W_U.detach().float()
    if w_dec.shape[0] != w_u.shape[0]:
        raise ValueError(
            f"the SAE writes {w_dec.shape[0]} dimensions but the model's residual stream has "
            f"{w_u.shape[0]}: is this SAE for this model?"
        )
    logits = (w_dec.to(w_u.device) @ w_u).cpu()
    tokenizer = getattr(model, "tokenizer", None)
    k = min(k, logits.numel())

    def rows(values: Tensor, ids: Tensor) -> list[dict[str, Any]]:
        return [
            {"token_id": int(i), "token": _token_text(tokenizer, int(i)), "logit": float(v)}
            for v, i in zip(values, ids)
        ]

    up = torch.topk(logits, k)
    down = torch.topk(-logits, k)
    return {"promoted": rows(up.values, up.indices), "suppressed": rows(-down.values, down.indices)}


def latent_statistics(
    statistics: Any,
    latent: int,
    *,
    features: LayerFeatures | None = None,
    proportion: float | None = None,
) -> dict[str, Any]:
    """MI, its rank, E, z̄_C, z̄_M and the latent's role (context / memory feature or none)."""
    mi = _clean_mi(statistics.mutual_information)
    if not 0 <= latent < mi.numel():
        raise ValueError(f"latent {latent} is outside the SAE's {mi.numel()} latents")
    expectation = statistics.expectation.detach().cpu().double()
    rank = int((mi > mi[latent]).sum()) + 1
    out: dict[str, Any] = {
        "latent": int(latent),
        "mutual_information": float(mi[latent]),
        "mutual_information_rank": rank,
        "expectation": float(expectation[latent]),
    }
    for name, key in (("context_activations", "z̄_C"), ("memory_activations", "z̄_M")):
        source = getattr(statistics, name, None)
        if source is None and features is not None:
            source = getattr(features, name)
        if source is not None:
            out[key] = float(source[latent])
    ctx, mem = _selection(statistics, features, proportion)
    if ctx is not None:
        out["role"] = (
            "context feature"
            if bool((ctx == latent).any())
            else "memory feature"
            if bool((mem == latent).any())
            else "not selected"
        )
    return out


def _selection(
    statistics: Any, features: LayerFeatures | None, proportion: float | None
) -> tuple[Tensor | None, Tensor | None]:
    if features is not None:
        return features.context_features, features.memory_features
    if proportion is not None:
        return select_functional_features(
            statistics.mutual_information, statistics.expectation, proportion
        )
    return None, None


# --------------------------------------------------------------------------------------
# One feature
# --------------------------------------------------------------------------------------


@dataclass
class FeatureReport:
    """Everything known about one latent at one layer."""

    layer: int
    latent: int
    statistics: dict[str, Any] = field(default_factory=dict)
    top_prompts: list[dict[str, Any]] = field(default_factory=list)
    promoted_tokens: list[dict[str, Any]] = field(default_factory=list)
    suppressed_tokens: list[dict[str, Any]] = field(default_factory=list)

    def to_markdown(self, max_chars: int = 160) -> str:
        lines = [f"### Layer {self.layer}, latent {self.latent}", ""]
        if self.statistics:
            lines += ["| statistic | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in self.statistics.items()]
            lines.append("")
        if self.promoted_tokens:
            promoted = ", ".join(
                f"`{t['token']!r}` ({t['logit']:.3g})" for t in self.promoted_tokens
            )
            lines += [f"**Promotes:** {promoted}", ""]
        if self.suppressed_tokens:
            suppressed = ", ".join(
                f"`{t['token']!r}` ({t['logit']:.3g})" for t in self.suppressed_tokens
            )
            lines += [f"**Suppresses:** {suppressed}", ""]
        if self.top_prompts:
            lines += ["| rank | activation | behaviour | prompt (end) |", "|---|---|---|---|"]
            for p in self.top_prompts:
                text = _tail(p["prompt"], max_chars).replace("|", "\\|").replace("\n", "⏎")
                lines.append(
                    f"| {p['rank']} | {p['activation']:.4g} | {p.get('label', '')} | {text} |"
                )
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self, max_chars: int = 240) -> str:
        e = html.escape
        parts = [f'<div class="feature-report"><h4>Layer {self.layer}, latent {self.latent}</h4>']
        if self.statistics:
            cells = "".join(
                f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
                for k, v in self.statistics.items()
            )
            parts.append(f'<table class="stats">{cells}</table>')
        for title, toks in (
            ("promotes", self.promoted_tokens),
            ("suppresses", self.suppressed_tokens),
        ):
            if toks:
                items = " ".join(
                    f'<code title="logit {t["logit"]:.3g}">{e(repr(t["token"]))}</code>'
                    for t in toks
                )
                parts.append(f"<p><b>Decoder direction {title}:</b> {items}</p>")
        if self.top_prompts:
            rows = "".join(
                f"<tr><td>{p['rank']}</td><td>{p['activation']:.4g}</td>"
                f"<td>{e(str(p.get('label', '')))}</td>"
                f'<td><pre class="prompt">{e(_tail(p["prompt"], max_chars))}</pre></td></tr>'
                for p in self.top_prompts
            )
            parts.append(
                '<table class="prompts"><tr><th>rank</th><th>activation</th><th>behaviour</th>'
                f"<th>prompt (end)</th></tr>{rows}</table>"
            )
        parts.append("</div>")
        return "".join(parts)


def _tail(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else "…" + text[-max_chars:]


def inspect_feature(
    layer: int,
    latent: int,
    *,
    statistics: Any | None = None,
    features: LayerFeatures | None = None,
    proportion: float | None = None,
    codes: Float[Tensor, "n d_sae"] | None = None,
    prompts: Sequence[str] | Sequence[Mapping[str, Any]] | None = None,
    model: Any | None = None,
    sae: Any | None = None,
    k: int = 10,
) -> FeatureReport:
    """Inspect ``latent`` at ``layer`` with whatever is given: statistics (MI, E, z̄), codes +
    prompts (top-activating prompts), model + SAE (logit lens)."""
    report = FeatureReport(layer=int(layer), latent=int(latent))
    if statistics is not None:
        report.statistics = latent_statistics(
            statistics, latent, features=features, proportion=proportion
        )
    if codes is not None:
        if prompts is None:
            raise ValueError("codes need the prompts they were computed on")
        report.top_prompts = top_activating_prompts(codes, prompts, latent, k=k)
    if model is not None and sae is not None:
        lens = logit_lens(model, sae, latent, k=k)
        report.promoted_tokens = lens["promoted"]
        report.suppressed_tokens = lens["suppressed"]
    return report


# --------------------------------------------------------------------------------------
# What drives context, what drives memory
# --------------------------------------------------------------------------------------


@dataclass
class LayerDrivers:
    """The top context features and memory features of one layer, ranked by MI."""

    layer: int
    context: list[dict[str, Any]]
    memory: list[dict[str, Any]]
    proportion: float | None = None

    def to_markdown(self) -> str:
        lines = [f"### Layer {self.layer}: what drives context, what drives memory", ""]
        for group, rows in (("context", self.context), ("memory", self.memory)):
            lines += [f"**{group} features** ({len(rows)} shown)", ""]
            if not rows:
                lines += ["(none)", ""]
                continue
            keys = [k for k in rows[0] if k != "tokens"]
            has_tokens = "tokens" in rows[0]
            header = keys + (["promotes"] if has_tokens else [])
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for r in rows:
                cells = [_fmt(r[k]) for k in keys]
                if has_tokens:
                    cells.append(", ".join(repr(t) for t in r["tokens"]).replace("|", "\\|"))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self) -> str:
        e = html.escape
        blocks = []
        for group, rows in (("context", self.context), ("memory", self.memory)):
            if not rows:
                blocks.append(
                    f'<div class="drivers {group}"><h5>{group} features</h5><p>(none)</p></div>'
                )
                continue
            keys = [k for k in rows[0] if k != "tokens"]
            has_tokens = "tokens" in rows[0]
            head = "".join(f"<th>{e(k)}</th>" for k in keys) + (
                "<th>promotes</th>" if has_tokens else ""
            )
            body = ""
            for r in rows:
                cells = "".join(f"<td>{e(_fmt(r[k]))}</td>" for k in keys)
                if has_tokens:
                    toks = " ".join(f"<code>{e(repr(t))}</code>" for t in r["tokens"])
                    cells += f"<td>{toks}</td>"
                body += f"<tr>{cells}</tr>"
            blocks.append(
                f'<div class="drivers {group}"><h5>{group} features</h5>'
                f"<table><tr>{head}</tr>{body}</table></div>"
            )
        k_text = f" (K = {self.proportion:g})" if self.proportion is not None else ""
        return (
            f'<div class="layer-drivers"><h4>Layer {self.layer}: what drives context, what '
            f"drives memory{k_text}</h4>{''.join(blocks)}</div>"
        )


def layer_drivers(
    statistics: Any,
    *,
    layer: int | None = None,
    features: LayerFeatures | None = None,
    proportion: float | None = None,
    top: int = 10,
    model: Any | None = None,
    sae: Any | None = None,
    n_tokens: int = 5,
) -> LayerDrivers:
    """The ``top`` context features and memory features of a layer, by mutual information.

    The features come from ``features`` or the selection at ``proportion``; with neither, all
    latents with E > 0 (context) and E < 0 (memory) are ranked. With ``model`` and ``sae``
    each row also lists the ``n_tokens`` tokens its decoder direction promotes.
    """
    mi = _clean_mi(statistics.mutual_information)
    expectation = statistics.expectation.detach().cpu().double()
    ctx, mem = _selection(statistics, features, proportion)
    if ctx is None or mem is None:
        order = torch.argsort(mi, descending=True, stable=True)
        ctx = order[expectation[order] > 0]
        mem = order[expectation[order] < 0]
    else:
        ctx = ctx[torch.argsort(mi[ctx], descending=True, stable=True)]
        mem = mem[torch.argsort(mi[mem], descending=True, stable=True)]
    z_c = getattr(statistics, "context_activations", None)
    z_m = getattr(statistics, "memory_activations", None)
    if features is not None:
        z_c = z_c if z_c is not None else features.context_activations
        z_m = z_m if z_m is not None else features.memory_activations
    if layer is None:
        layer = int(getattr(statistics, "layer", getattr(features, "layer", -1)))

    def rows(ids: Tensor) -> list[dict[str, Any]]:
        out = []
        for rank, i in enumerate(ids[:top].tolist(), start=1):
            row: dict[str, Any] = {
                "rank": rank,
                "latent": i,
                "mutual_information": float(mi[i]),
                "expectation": float(expectation[i]),
            }
            if z_c is not None and z_m is not None:
                row["z̄_C"] = float(z_c[i])
                row["z̄_M"] = float(z_m[i])
            if model is not None and sae is not None:
                row["tokens"] = [
                    t["token"] for t in logit_lens(model, sae, i, k=n_tokens)["promoted"]
                ]
            out.append(row)
        return out

    return LayerDrivers(
        layer=layer,
        context=rows(ctx),
        memory=rows(mem),
        proportion=proportion if features is None else None,
    )
