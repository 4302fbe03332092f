"""The key/value cache of generation, and attention over it.

A `KVCache` holds, for every layer of this rank's model chunks, the keys and values of up to `capacity` positions of
`rows` sequences: [rows, K/V heads on this TP rank, capacity, head dim] each, allocated once. A forward call uses it
through a `CacheStep`: the call's batch rows are cache rows `rows` (all of them, in order, when None), and row r's
s new tokens sit at positions start[r] .. start[r] + s - 1. Each attention layer writes its new keys and values there
and attends over positions 0 .. start[r] + q of its row, so rows of different lengths share one decode call with no
padding computed beyond the longest row's keys (the mask hides the rest).

Bytes per cached token: 2 (K and V) x layers x K/V heads x head dim x element size (per TP rank: heads / TP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megalite.backends.attention import _SDPA_HAS_GQA, expand_kv


@dataclass
class KVCache:
    """Keys and values per global layer index, each [rows, kv heads, capacity, head dim]."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]

    @classmethod
    def allocate(cls, layers: dict[int, tuple[int, int]], rows: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> KVCache:
        """Zeroed buffers for `layers` (global index -> (kv heads, head dim) on this rank). Zeros, not empty memory:
        a masked position's score is -inf only if its key is finite, and its weight 0 x value is 0 only if its value
        is (garbage there would turn whole rows into NaN)."""
        shapes = {i: (rows, heads, capacity, dim) for i, (heads, dim) in layers.items()}
        return cls({i: torch.zeros(s, dtype=dtype, device=device) for i, s in shapes.items()},
                   {i: torch.zeros(s, dtype=dtype, device=device) for i, s in shapes.items()})

    @property
    def rows(self) -> int:
        return next(iter(self.keys.values())).shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def bytes_per_token(self) -> int:
        """Cache bytes one token position takes on this rank (all layers, K and V)."""
        return sum(t[0, :, 0].numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())


class CacheStep:
    """How one forward call uses the cache: batch row i is cache row rows[i] (None: batch row i is cache row i, for
    the first b rows), and its new tokens start at position start[i] (the tokens its cache row already holds).

    What every layer of the call shares (index tensors, the mask) is computed once, by the first layer. When all
    rows start at the same position (a prefill; decode steps of equal-length rows) keys are written and read by
    slicing, and no mask is built unless the new tokens attend causally among themselves after cached ones. A call
    that starts every row at 0 (prefill) attends over its own new keys directly. The model computes the logits of
    the last position only, unless `all_logits`.
    """

    def __init__(self, cache: KVCache, start: list[int], rows: list[int] | None = None, all_logits: bool = False):
        self.cache, self.start, self.rows = cache, list(start), None if rows is None else list(rows)
        self.all_logits = all_logits
        device = next(iter(cache.keys.values())).device if cache.keys else torch.device("cpu")
        self.device = device
        self.start_tensor = torch.tensor(self.start, dtype=torch.int64, device=device)
        self.rows_tensor = None if rows is None else torch.tensor(self.rows, dtype=torch.int64, device=device)
        self.uniform = min(self.start) == max(self.start)
        self._shared: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def positions(self, s: int) -> torch.Tensor:
        """[b, s] positions of the call's new tokens (the rotary position ids)."""
        return self.start_tensor.unsqueeze(1) + torch.arange(s, device=self.device)

    def _index_and_mask(self, s: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the positions [b, s] to write, None when slicing; the mask [b, 1, s, length], None when not needed)."""
        if s not in self._shared:
            first, length = self.start[0], max(self.start) + s
            pos = None if self.uniform else self.positions(s)
            mask = None
            if not (self.uniform and (s == 1 or first == 0)):
                where = pos if pos is not None else self.positions(s)
                mask = (torch.arange(length, device=self.device) <= where.unsqueeze(-1)).unsqueeze(1)
            self._shared[s] = (pos, mask)
        return self._shared[s]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new k, v [b, hkv, s, d] of global layer `layer` and attend the queries q [b, hq, s, d] over
        each row's cached and new positions (causal); returns [b, hq, s, d]."""
        b, _, s, _ = k.shape
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        length = max(self.start) + s
        if length > keys.shape[2]:
            raise ValueError(f"the KV cache holds {keys.shape[2]} positions; a call writes up to position {length - 1}")
        pos, mask = self._index_and_mask(s)
        rows = self.rows
        if pos is None:  # every row writes positions first .. first + s - 1
            first = self.start[0]
            where = slice(0, b) if rows is None else slice(rows[0], rows[0] + 1) if b == 1 else self.rows_tensor
            keys[where, :, first:first + s] = k
            values[where, :, first:first + s] = v
        else:  # advanced indices on dims 0 and 2 (a slice between them): the indexed view is [b, s, hkv, d]
            index = (torch.arange(b, device=self.device) if rows is None else self.rows_tensor).unsqueeze(1)
            keys[index, :, pos] = k.transpose(1, 2)
            values[index, :, pos] = v.transpose(1, 2)
        if pos is None and self.start[0] == 0:  # nothing cached before: the new keys are all there is
            k_all, v_all = k, v
        elif rows is None:
            k_all, v_all = keys[:b, :, :length], values[:b, :, :length]
        elif b == 1:
            k_all, v_all = keys[rows[0]:rows[0] + 1, :, :length], values[rows[0]:rows[0] + 1, :, :length]
        else:
            k_all, v_all = keys[self.rows_tensor, :, :length], values[self.rows_tensor, :, :length]
        return grouped_sdpa(q, k_all, v_all, mask, causal=mask is None and s > 1)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool) -> torch.Tensor:
    """SDPA of q [b, hq, s, d] over grouped k, v [b, hkv, L, d], masked by `mask` or causal (s = L) or neither."""
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=k.shape[1] != q.shape[1])
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
