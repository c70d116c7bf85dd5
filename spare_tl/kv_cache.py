"""The KV caches batched generation passes around (TransformerLens's
``TransformerLensKeyValueCache``, on the hooked model and the bridge): copies mapped along the
batch, a shared prefix expanded to a batch, finished rows dropped, several caches stacked.
Each function returns a new cache; the one it is given is never changed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import copy
from typing import Any

import torch
from torch import Tensor

from spare_tl.bridge import is_bridge


def map_cache(kv, fn: Callable[[Tensor], Tensor]):
    """A new KV cache whose keys, values and attention mask are ``fn`` of ``kv``'s (applied
    along the batch dimension); the original is never changed (appending concatenates)."""
    out = copy(kv)
    out.entries = []
    for entry in kv.entries:
        e = copy(entry)
        e.past_keys, e.past_values = fn(entry.past_keys), fn(entry.past_values)
        out.entries.append(e)
    out.previous_attention_mask = fn(kv.previous_attention_mask)
    return out


def stack_caches(model, caches: Sequence[Any]):
    """One KV cache holding the rows of ``caches`` in order (batch dimension), each left-
    padded with masked-out positions to the longest. Positions are counted from the
    attention mask, so a padded row sees exactly what it saw alone (CAD decodes its two
    prompt versions as one batch this way)."""
    pos_dim = 2 if is_bridge(model) else 1  # the bridge keeps HF's [batch, heads, pos, d]
    length = max(kv.previous_attention_mask.shape[1] for kv in caches)

    def padded(t: Tensor, missing: int, dim: int) -> Tensor:
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    out = copy(caches[0])
    out.entries = []
    missing = [length - kv.previous_attention_mask.shape[1] for kv in caches]
    for layer, entry in enumerate(caches[0].entries):
        e = copy(entry)
        rows = [kv.entries[layer] for kv in caches]
        e.past_keys = torch.cat([padded(r.past_keys, m, pos_dim) for r, m in zip(rows, missing)])
        e.past_values = torch.cat(
            [padded(r.past_values, m, pos_dim) for r, m in zip(rows, missing)]
        )
        out.entries.append(e)
    out.previous_attention_mask = torch.cat(
        [padded(kv.previous_attention_mask, m, 1) for kv, m in zip(caches, missing)]
    )
    return out


def expand_cache(kv, batch: int):
    """A batch-``batch`` view of a batch-1 (or batch-``batch``) KV cache (the shared prefix)."""
    return map_cache(kv, lambda t: t.expand(batch, *t.shape[1:]))


def select_rows(kv, rows: Tensor):
    """A KV cache holding only ``rows`` of ``kv`` (for dropping finished rows)."""
    return map_cache(kv, lambda t: t[rows])
