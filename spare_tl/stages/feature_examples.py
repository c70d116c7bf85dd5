"""The feature-examples stage: what text makes each SAE latent fire.

One pass over two sources, (a) the grouped prompts (the behaviour groups' prompts) and (b) a
sample of general text in the SAEs' training format (:func:`spare_tl.stages.sae_text.prompt_texts`),
through every SAE of the setup. Per latent it keeps

- its **top-k contexts** per source: a bounded top-k over passages (a passage's score is its
  largest activation), merged batch by batch, never all activations;
- its **activation density** (fraction of tokens where it fires) per source;

and, for the latents asked for (``latents``: the functional features), the per-token
activations of a window around the firing token of each top context, a histogram of its
non-zero activations on the text tokens and its last-position activation on every grouped
prompt (for per-behaviour histograms). Saved under ``cache_data/<model>/feature_examples/``
as one ``<hook>.safetensors`` (densities, histograms, last-position activations) and one
``<hook>.json`` (examples) per SAE, with ``config.json`` written last.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spare_tl import cache
from spare_tl.data.schema import ConflictItem
from spare_tl.embedded import EMBEDDED_MODEL, SHIPPED_ROOT
from spare_tl.features import sae_fingerprint
from spare_tl.saes import encode_latents, hook_name
from spare_tl.stages.sae_text import prompt_texts, split_items, tokenize_text

logger = logging.getLogger(__name__)

STAGE = "feature_examples"
SOURCES = ("grouped", "text")


@dataclass(frozen=True)
class FeatureExamplesConfig:
    """How many examples, passages and histogram bins the stage keeps."""

    k: int = 8  # top contexts per latent and source
    n_text: int = 2000  # general-text passages
    text_tokens: int = 16  # tokens per passage (the tail of one training-format prompt)
    n_grouped: int | None = 128  # grouped prompts, a seeded sample (None: all)
    before: int = 12  # tokens kept before the firing token
    after: int = 3  # and after it
    n_bins: int = 24  # histogram bins over log10(activation) in [log_min, log_max]
    log_min: float = -2.0
    log_max: float = 2.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.n_text < 0 or self.text_tokens < 2 or self.batch_size < 1:
            raise ValueError(f"bad feature-examples config: {self}")


def top_k_merge(
    values: Float[Tensor, "k d_sae"],
    index: Int[Tensor, "k d_sae"],
    new_values: Float[Tensor, "b d_sae"],
    new_index: Int[Tensor, "b d_sae"],
    k: int,
) -> tuple[Float[Tensor, "k d_sae"], Int[Tensor, "k d_sae"]]:
    """Merge a batch of candidates into each latent's top-k (largest first)."""
    all_values = torch.cat([values, new_values])
    all_index = torch.cat([index, new_index])
    top = torch.topk(all_values, min(k, all_values.shape[0]), dim=0)
    return top.values, torch.gather(all_index, 0, top.indices)


@dataclass
class _Tracker:
    """The running top-k, density and histograms of one SAE on one source."""

    d_sae: int
    k: int
    latents: Tensor  # the latents whose firing windows and histograms are kept
    n_bins: int
    values: Tensor = field(init=False)
    passage: Tensor = field(init=False)
    fired: Tensor = field(init=False)
    n_tokens: int = 0
    histogram: Tensor = field(init=False)
    windows: dict[int, Tensor] = field(default_factory=dict)  # passage -> (n_sel, before+after+1)
    centres: dict[int, Tensor] = field(default_factory=dict)  # passage -> (n_sel,) positions

    def __post_init__(self) -> None:
        self.values = torch.full((0, self.d_sae), -1.0)
        self.passage = torch.zeros((0, self.d_sae), dtype=torch.long)
        self.fired = torch.zeros(self.d_sae, dtype=torch.long)
        self.histogram = torch.zeros((len(self.latents), self.n_bins), dtype=torch.long)


def _window(row: Tensor, centre: int, before: int, after: int, length: int) -> Tensor:
    """``row[centre - before : centre + after + 1]`` padded with NaN outside ``[0, length)``."""
    out = torch.full((before + after + 1,), float("nan"))
    lo, hi = max(centre - before, 0), min(centre + after + 1, length)
    out[lo - (centre - before) : hi - (centre - before)] = row[lo:hi]
    return out


def _update(
    tracker: _Tracker,
    codes: Float[Tensor, "b pos d_sae"],
    lengths: Int[Tensor, " b"],
    ids: Int[Tensor, " b"],
    config: FeatureExamplesConfig,
) -> None:
    """Add one batch of passages (their ids ``ids``); position 0 (BOS) never counts."""
    b, t, _ = codes.shape
    pos = torch.arange(t)[None, :]
    valid = (pos < lengths[:, None]) & (pos > 0)
    codes = codes.masked_fill(~valid[..., None], 0.0)
    tracker.fired += (codes > 0).sum((0, 1))
    tracker.n_tokens += int(valid.sum())
    best, where = codes.max(dim=1)  # (b, d_sae)
    tracker.values, tracker.passage = top_k_merge(
        tracker.values, tracker.passage, best, ids[:, None].expand(b, tracker.d_sae), tracker.k
    )
    if not len(tracker.latents):
        return
    sel = codes[..., tracker.latents]  # (b, pos, n_sel)
    edges = torch.linspace(config.log_min, config.log_max, config.n_bins + 1)
    for j in range(sel.shape[-1]):
        acts = sel[..., j][sel[..., j] > 0].log10().clamp(config.log_min, config.log_max - 1e-6)
        tracker.histogram[j] += torch.bincount(
            torch.bucketize(acts, edges[1:-1], right=True), minlength=config.n_bins
        )
    keep = set(tracker.passage[:, tracker.latents].flatten().tolist())
    for row, pid in enumerate(ids.tolist()):
        if pid in keep:
            tracker.windows[pid] = torch.stack(
                [
                    _window(sel[row, :, j], int(c), config.before, config.after, int(lengths[row]))
                    for j, c in enumerate(where[row, tracker.latents].tolist())
                ]
            )
            tracker.centres[pid] = where[row, tracker.latents].clone()
    for pid in [p for p in tracker.windows if p not in keep]:  # bounded: only the top-k
        del tracker.windows[pid], tracker.centres[pid]


def text_passages(
    model, items: Sequence[ConflictItem], n: int, n_tokens: int, seed: int = 0
) -> list[list[int]]:
    """``n`` general-text passages: the last ``n_tokens`` tokens (after BOS) of prompts in the
    SAEs' training format over ``items`` (prompt, taught answer)."""
    stream = prompt_texts(items, seed)
    bos = tokenize_text(model, "")
    out = []
    for _ in range(n):
        _, text = next(stream)
        ids = tokenize_text(model, text.rstrip("\n"))[len(bos) :]
        out.append(bos + ids[-n_tokens:])
    return out


def _batches(passages: Sequence[Sequence[int]], size: int, pad: int):
    order = sorted(range(len(passages)), key=lambda i: len(passages[i]))
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        lengths = torch.tensor([len(passages[i]) for i in idx])
        tokens = torch.full((len(idx), int(lengths.max())), pad, dtype=torch.long)
        for row, i in enumerate(idx):
            tokens[row, : len(passages[i])] = torch.tensor(passages[i])
        yield idx, tokens, lengths


@torch.no_grad()
def collect_examples(
    model,
    saes: Mapping[str, Any],
    passages: Sequence[Sequence[int]],
    config: FeatureExamplesConfig,
    latents: Mapping[str, Sequence[int]] | None = None,
    *,
    latent_code: str = "encode",
    progress: bool = True,
    desc: str = "feature examples",
) -> tuple[dict[str, _Tracker], dict[str, Tensor]]:
    """Run ``passages`` (token ids, BOS first) through the model once (right-padded batches,
    stopped after the deepest SAE's layer), updating every SAE's tracker per batch. Also
    returns each SAE's last-position codes of its ``latents`` (n_passages, n_sel)."""
    latents = latents or {}
    hooks = list(saes)
    stop = max(int(h.split(".")[1]) for h in hooks) + 1
    trackers = {
        h: _Tracker(
            int(saes[h].cfg.d_sae),
            config.k,
            torch.tensor(list(latents.get(h, [])), dtype=torch.long),
            config.n_bins,
        )
        for h in hooks
    }
    last = {h: torch.zeros(len(passages), len(trackers[h].latents)) for h in hooks}
    pad = model.tokenizer.pad_token_id or 0
    batches = list(_batches(passages, config.batch_size, pad))
    for idx, tokens, lengths in tqdm(batches, desc=desc, disable=not progress):
        _, store = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop)
        ids = torch.tensor(idx)
        for h in hooks:
            codes = encode_latents(saes[h], store[h], latent_code).float().cpu()
            tracker = trackers[h]
            if len(tracker.latents):
                last[h][ids] = codes[torch.arange(len(idx)), lengths - 1][:, tracker.latents]
            _update(tracker, codes, lengths, ids, config)
    return trackers, last


# --------------------------------------------------------------------------------------
# The stage's result
# --------------------------------------------------------------------------------------


@dataclass
class SAEExamples:
    """One SAE's feature examples: densities for every latent; examples, histograms and
    last-position activations on the grouped prompts for ``latents``."""

    hook_name: str
    latents: list[int]
    density: dict[str, Tensor]  # source -> (d_sae,) fraction of tokens where a latent fires
    histogram: Tensor  # (n_sel, n_bins) counts of log10(activation) on the text tokens
    edges: list[float]  # the histogram's bin edges (log10 activation)
    last_position: Tensor  # (n_grouped, n_sel) activation at each grouped prompt's last token
    labels: list[str]  # the grouped prompts' behaviour labels
    examples: dict[int, dict[str, list[dict[str, Any]]]]  # latent -> source -> top contexts
    n_tokens: dict[str, int] = field(default_factory=dict)
    logit_tokens: dict[int, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def column(self, latent: int) -> int:
        if latent not in self.latents:
            raise ValueError(
                f"{self.hook_name}: latent {latent} has no saved examples (saved: "
                f"{self.latents[:12]}{'…' if len(self.latents) > 12 else ''}); run the "
                "feature-examples stage with it in `latents`"
            )
        return self.latents.index(latent)

    def of(self, latent: int) -> dict[str, Any]:
        """Everything saved about ``latent``: density per source, histogram, per-group
        last-position activations and the top contexts per source."""
        j = self.column(latent)
        groups = {
            g: [float(v) for v, lab in zip(self.last_position[:, j], self.labels) if lab == g]
            for g in ("context", "memory", "neither")
        }
        return {
            "hook_name": self.hook_name,
            "latent": latent,
            "density": {s: float(d[latent]) for s, d in self.density.items()},
            "histogram": [int(c) for c in self.histogram[j]],
            "edges": self.edges,
            "last_position": groups,
            "examples": self.examples[latent],
            **self.logit_tokens.get(latent, {}),
        }

    def save(self, directory: Path, fingerprint: str) -> None:
        name = self.hook_name
        cache.write_tensors(
            directory / f"{name}.safetensors",
            {
                **{f"density.{s}": d.float() for s, d in self.density.items()},
                "histogram": self.histogram.to(torch.int32),
                "last_position": self.last_position.float(),
            },
        )
        cache.write_json(  # last: its presence with the fingerprint marks this SAE done
            directory / f"{name}.json",
            {
                "hook_name": name,
                "fingerprint": fingerprint,
                "latents": self.latents,
                "edges": self.edges,
                "labels": self.labels,
                "n_tokens": self.n_tokens,
                "examples": {str(k): v for k, v in self.examples.items()},
                "logit_tokens": {str(k): v for k, v in self.logit_tokens.items()},
            },
        )

    @classmethod
    def load(cls, directory: Path, hook: str) -> SAEExamples:
        meta = cache.read_json(directory / f"{hook}.json")
        t = cache.read_tensors(directory / f"{hook}.safetensors")
        return cls(
            hook_name=hook,
            latents=[int(x) for x in meta["latents"]],
            density={s: t[f"density.{s}"] for s in SOURCES if f"density.{s}" in t},
            histogram=t["histogram"].long(),
            edges=list(meta["edges"]),
            last_position=t["last_position"],
            labels=list(meta["labels"]),
            examples={int(k): v for k, v in meta["examples"].items()},
            n_tokens=dict(meta.get("n_tokens", {})),
            logit_tokens={int(k): v for k, v in meta.get("logit_tokens", {}).items()},
        )


@dataclass
class FeatureExamples:
    """The stage's result: :class:`SAEExamples` by hook name."""

    model_name: str
    by_hook: dict[str, SAEExamples]
    config: dict[str, Any] = field(default_factory=dict)

    def of(self, hook: str, latent: int) -> dict[str, Any]:
        """:meth:`SAEExamples.of` for the SAE at ``hook``."""
        if hook not in self.by_hook:
            raise ValueError(f"no feature examples for {hook} (have {sorted(self.by_hook)})")
        return self.by_hook[hook].of(latent)

    @classmethod
    def load(cls, directory: str | Path) -> FeatureExamples:
        """Load a completed stage, checked against its manifest."""
        directory = Path(directory)
        stored = cache.verify_stage(directory)
        config = stored["config"]
        return cls(
            model_name=config["model"],
            by_hook={h: SAEExamples.load(directory, h) for h in config["hooks"]},
            config=config,
        )


def _records(
    tracker: _Tracker,
    passages: Sequence[Sequence[int]],
    decode: Any,
    config: FeatureExamplesConfig,
) -> dict[int, list[dict[str, Any]]]:
    """The top contexts of every tracked latent: tokens and per-token activations."""
    out: dict[int, list[dict[str, Any]]] = {}
    for j, latent in enumerate(tracker.latents.tolist()):
        rows = []
        for value, pid in zip(tracker.values[:, latent].tolist(), tracker.passage[:, latent]):
            pid = int(pid)
            if value <= 0:
                break
            centre = int(tracker.centres[pid][j])
            window = tracker.windows[pid][j]
            lo = centre - config.before
            tokens, acts = [], []
            for offset, a in enumerate(window.tolist()):
                if a != a:  # NaN: outside the passage
                    continue
                tokens.append(decode(int(passages[pid][lo + offset])))
                acts.append(round(float(a), 4))
            rows.append(
                {
                    "passage": pid,
                    "position": centre,
                    "activation": round(float(value), 4),
                    "tokens": tokens,
                    "activations": acts,
                }
            )
        out[latent] = rows
    return out


def feature_examples(
    model,
    saes: Mapping[str, Any],
    grouped: Sequence[Mapping[str, Any]],
    text_items: Sequence[ConflictItem],
    *,
    latents: Mapping[str, Sequence[int]] | None = None,
    config: FeatureExamplesConfig | None = None,
    directory: str | Path | None = None,
    latent_code: str = "encode",
    progress: bool = True,
) -> FeatureExamples:
    """Run the stage: every SAE in ``saes`` (keyed by hook name) over the ``grouped`` prompt
    records and ``config.n_text`` general-text passages built from ``text_items``.

    With ``directory`` the result is cached there: a finished stage of the same config is
    loaded, a stopped one resumes with the SAEs it had not saved yet.
    """
    config = config or FeatureExamplesConfig()
    latents = {h: sorted({int(x) for x in latents.get(h, [])}) for h in saes} if latents else {}
    saes = {hook_name(s) if not isinstance(h, str) else h: s for h, s in saes.items()}
    records = list(grouped)
    if config.n_grouped is not None and config.n_grouped < len(records):
        keep = sorted(
            random.Random(f"grouped:{config.seed}").sample(range(len(records)), config.n_grouped)
        )
        records = [records[i] for i in keep]
    stage_config = {
        "stage": STAGE,
        "model": model.cfg.model_name,
        "hooks": sorted(saes, key=lambda h: (int(h.split(".")[1]), h)),
        "sae_fingerprints": {h: sae_fingerprint(s) for h, s in saes.items()},
        "latents": {h: v for h, v in latents.items()},
        "latent_code": latent_code,
        "n_grouped": len(records),
        "n_text_items": len(text_items),
        **asdict(config),
    }
    key = cache.fingerprint(stage_config)
    if directory is not None:
        directory = Path(directory)
        if cache.is_fresh(directory, stage_config):
            return FeatureExamples.load(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / cache.CONFIG).unlink(missing_ok=True)
    done = {
        h: SAEExamples.load(directory, h)
        for h in saes
        if directory is not None and _saved_with(directory, h, key)
    }
    todo = {h: s for h, s in saes.items() if h not in done}
    if todo:
        sources = {
            "grouped": [tokenize_text(model, r["prompt"]) for r in records],
            "text": text_passages(
                model, text_items, config.n_text, config.text_tokens, config.seed
            ),
        }
        found: dict[str, dict[str, Any]] = {h: {} for h in todo}
        for source, passages in sources.items():
            trackers, last = collect_examples(
                model,
                todo,
                passages,
                config,
                latents,
                latent_code=latent_code,
                progress=progress,
                desc=f"feature examples: {source}",
            )
            decode = _decoder(model)
            for h, tracker in trackers.items():
                found[h][source] = (tracker, _records(tracker, passages, decode, config), last[h])
        for h in todo:
            done[h] = _assemble(h, latents.get(h, []), found[h], records, config)
            done[h].logit_tokens = logit_tokens(model, saes[h], done[h].latents)
            if directory is not None:
                done[h].save(directory, key)
    for h, found_h in done.items():  # saved before the logit lens was kept: add it
        if found_h.latents and not found_h.logit_tokens:
            found_h.logit_tokens = logit_tokens(model, saes[h], found_h.latents)
            if directory is not None:
                found_h.save(directory, key)
    result = FeatureExamples(
        model.cfg.model_name, {h: done[h] for h in stage_config["hooks"]}, stage_config
    )
    if directory is not None:
        cache.mark_complete(
            directory,
            stage_config,
            files=[f"{h}.{ext}" for h in stage_config["hooks"] for ext in ("safetensors", "json")],
        )
    return result


def _saved_with(directory: Path, hook: str, key: str) -> bool:
    path = directory / f"{hook}.json"
    if not (path.is_file() and (directory / f"{hook}.safetensors").is_file()):
        return False
    return cache.read_json(path).get("fingerprint") == key


@torch.no_grad()
def logit_tokens(
    model, sae: Any, latents: Sequence[int], k: int = 10
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Per latent, the ``k`` tokens its decoder direction promotes and suppresses most
    through the unembedding (``W_dec[latent] @ W_U``, no final norm)."""
    if not latents:
        return {}
    w_u = model.W_U.detach().float()
    scores = (sae.W_dec[list(latents)].detach().float().to(w_u.device) @ w_u).cpu()
    decode = _decoder(model)
    out = {}
    for latent, row in zip(latents, scores):
        up, down = torch.topk(row, k), torch.topk(-row, k)
        out[int(latent)] = {
            "promoted": [
                {"token": decode(int(i)), "logit": round(float(v), 4)}
                for v, i in zip(up.values, up.indices)
            ],
            "suppressed": [
                {"token": decode(int(i)), "logit": round(-float(v), 4)}
                for v, i in zip(down.values, down.indices)
            ],
        }
    return out


def _decoder(model) -> Any:
    tok = model.tokenizer
    memo: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in memo:
            memo[token_id] = tok.decode([token_id])
        return memo[token_id]

    return decode


def _assemble(
    hook: str,
    latents: Sequence[int],
    found: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    config: FeatureExamplesConfig,
) -> SAEExamples:
    grouped_tracker, grouped_examples, last = found["grouped"]
    text_tracker, text_examples, _ = found["text"]
    density = {
        s: t.fired.double() / max(t.n_tokens, 1)
        for s, t in (("grouped", grouped_tracker), ("text", text_tracker))
    }
    return SAEExamples(
        hook_name=hook,
        latents=list(latents),
        density={s: d.float() for s, d in density.items()},
        histogram=text_tracker.histogram,
        edges=torch.linspace(config.log_min, config.log_max, config.n_bins + 1).tolist(),
        last_position=last,
        labels=[str(r.get("label", "")) for r in records],
        examples={
            latent: {"grouped": grouped_examples[latent], "text": text_examples[latent]}
            for latent in latents
        },
        n_tokens={"grouped": grouped_tracker.n_tokens, "text": text_tracker.n_tokens},
    )


def load_feature_examples(
    model_name: str = EMBEDDED_MODEL, *, root: str | Path | None = None
) -> FeatureExamples:
    """The saved feature examples of ``model_name`` (the shipped ones for the embedded model
    when the writable cache has none)."""
    roots = [Path(root)] if root is not None else [cache.default_cache_root(), SHIPPED_ROOT]
    for base in roots:
        directory = cache.stage_dir(model_name, STAGE, base)
        if (directory / cache.CONFIG).is_file():
            return FeatureExamples.load(directory)
    raise FileNotFoundError(
        f"no feature examples for {model_name!r} under {', '.join(map(str, roots))}; run "
        "`spare-tl features examples` first"
    )


def functional_latents(features: Any) -> dict[str, list[int]]:
    """The latents of a :class:`~spare_tl.features.FunctionalFeatures` set (both directions)
    by hook name: the latents whose examples the stage keeps."""
    sets = [features] + ([features.to_memory] if features.to_memory is not None else [])
    out: dict[str, set[int]] = {}
    for fset in sets:
        for f in fset.layers.values():
            ids = torch.cat([f.context_features, f.memory_features]).tolist()
            out.setdefault(f.hook_name, set()).update(int(i) for i in ids)
    return {h: sorted(v) for h, v in out.items()}


def sae_training_items(dataset: str = "builtin") -> list[ConflictItem]:
    """The questions the SAEs' training text was built from (the training side of
    :func:`spare_tl.stages.sae_text.split_items` with the default SAE config)."""
    from spare_tl.data.datasets import load_dataset
    from spare_tl.stages.sae_config import SAETrainingConfig

    cfg = SAETrainingConfig()
    train, _ = split_items(load_dataset(dataset), cfg.heldout_fraction, cfg.seed)
    return train
