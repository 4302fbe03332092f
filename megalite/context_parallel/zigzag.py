"""Zigzag sharding of the sequence over context-parallel ranks.

The sequence is cut into 2*cp equal chunks; CP rank r keeps chunks r and 2*cp-1-r, concatenated. Under causal
attention an early chunk is cheap and a late one expensive, so every rank gets the same amount of work.
Example, cp=2, 8 tokens: rank 0 holds positions [0, 1, 6, 7], rank 1 holds [2, 3, 4, 5].
"""
from __future__ import annotations

import torch


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk indices (of 2*cp_size) that CP rank `cp_rank` holds: (r, 2*cp_size - 1 - r)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} is outside [0, {cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _chunk_length(length: int, cp_size: int) -> int:
    if length % (2 * cp_size):
        raise ValueError(
            f"sequence length {length} must be divisible by 2 * context-parallel size = {2 * cp_size} for zigzag "
            "sharding; change --seq-length or --context-parallel-size"
        )
    return length // (2 * cp_size)


def zigzag_shard(x: torch.Tensor, dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This CP rank's zigzag shard of `x` along `dim`: chunks r and 2*cp-1-r of 2*cp, concatenated."""
    c = _chunk_length(x.size(dim), cp_size)
    first, second = zigzag_chunks(cp_rank, cp_size)
    return torch.cat([x.narrow(dim, first * c, c), x.narrow(dim, second * c, c)], dim=dim)


def zigzag_unshard(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The full tensor from every CP rank's shard, in CP-rank order (inverse of `zigzag_shard`)."""
    halves = [s.chunk(2, dim=dim) for s in shards]
    ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(ordered, dim=dim)


def zigzag_positions(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions in the full sequence of this rank's local tokens (for rotary embeddings), as int64."""
    c = _chunk_length(seq_length, cp_size)
    first, second = zigzag_chunks(cp_rank, cp_size)
    return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)])
