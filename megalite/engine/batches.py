"""This rank's microbatches of a global batch: data-parallel slicing, context-parallel (zigzag) sharding.

Every rank of a pipeline group builds the same microbatches, so any field a loss reads reaches the last stage. Per-
token fields ([b, s, ...], s the sequence length) are zigzag-sharded over CP like the tokens; per-sample fields
([b, ...] otherwise) are kept whole. Position ids travel with the batch when --reset-position-ids restarts them per
document, and always under CP (the zigzag positions); otherwise the model numbers the positions 0..s-1.
"""
from __future__ import annotations

import torch

from megalite.context_parallel import zigzag_positions, zigzag_shard
from megalite.parallel_state import ProcessGroups

Batch = dict[str, torch.Tensor]


def shard_for_context_parallel(batch: Batch, seq_length: int, cp_rank: int, cp_size: int) -> Batch:
    """This CP rank's part of a microbatch: per-token fields zigzag-sharded, per-sample fields whole, and position
    ids (the zigzag positions unless the batch brings its own)."""
    if cp_size == 1:
        return batch
    out = {k: zigzag_shard(v, 1, cp_rank, cp_size) if is_per_token(v, seq_length) else v for k, v in batch.items()}
    out.setdefault("position_ids", zigzag_positions(seq_length, cp_rank, cp_size).unsqueeze(0))
    return out


def is_per_token(value: torch.Tensor, seq_length: int) -> bool:
    """Whether a batch field is per token ([b, s, ...]) rather than per sample."""
    return value.dim() >= 2 and value.shape[1] == seq_length


def microbatches(dataset, consumed: int, num_microbatches: int, micro_batch_size: int, seq_length: int,
                 groups: ProcessGroups, device: torch.device, keep_position_ids: bool) -> list[Batch]:
    """This rank's `num_microbatches` microbatches of the global batch that starts at sample `consumed`: microbatch
    j of DP rank d holds samples consumed + (j DP + d) mbs ..., CP-sharded. Samples are dicts of tensors."""
    dp, dp_rank = groups.size("dp"), groups.rank("dp")
    out = []
    for j in range(num_microbatches):
        start = consumed + (j * dp + dp_rank) * micro_batch_size
        samples = [dataset[i] for i in range(start, start + micro_batch_size)]
        keys = [k for k in samples[0] if k != "position_ids" or keep_position_ids]
        batch = {k: torch.stack([s[k] for s in samples]) for k in keys}
        batch = shard_for_context_parallel(batch, seq_length, groups.rank("cp"), groups.size("cp"))
        out.append({k: v.to(device) for k, v in batch.items()})
    return out
