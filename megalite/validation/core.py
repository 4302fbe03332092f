"""What every validation rule shares: the error type (from `megalite.errors`), flag names, and `Defaults`, the values that follow from
other flags, computed once per config and passed to each rule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from megalite.config import MegaliteConfig


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: `seq_length` -> `--seq-length`."""
    return "--" + field_name.replace("_", "-")


def default_ffn_hidden_size(hidden: int, swiglu: bool) -> int:
    """4 x hidden, or 8/3 x hidden rounded up to a multiple of 64 with SwiGLU."""
    if not swiglu:
        return 4 * hidden
    return math.ceil(8 * hidden / 3 / 64) * 64


@dataclass(frozen=True)
class Defaults:
    """The values that follow from the flags and the world size: a flag's default where it was not given."""

    world_size: int
    data_parallel_size: int
    expert_tensor_parallel_size: int
    expert_data_parallel_size: int
    num_query_groups: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: int | None
    """None for a dense model."""
    global_batch_size: int
    num_microbatches: int
    """0 where the micro batch size or the data-parallel size is below 1."""


def defaults(c: MegaliteConfig, world_size: int) -> Defaults:
    """The `Defaults` of `c` on `world_size` ranks. Never raises: on invalid sizes (below 1, not dividing the
    world) the values are placeholders, and the rules report the sizes."""
    p, m, t = c.parallel, c.model, c.training
    dp = world_size // max(1, p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size)
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    edp = world_size // max(1, etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size)
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.swiglu)
    gbs = t.global_batch_size or t.micro_batch_size * max(dp, 1)
    return Defaults(
        world_size=world_size,
        data_parallel_size=dp,
        expert_tensor_parallel_size=etp,
        expert_data_parallel_size=edp,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=(m.moe_ffn_hidden_size or ffn) if m.num_experts else None,
        global_batch_size=gbs,
        num_microbatches=gbs // (t.micro_batch_size * dp) if t.micro_batch_size >= 1 and dp >= 1 else 0,
    )


Rule = Callable[[MegaliteConfig, Defaults], "str | None"]
"""A validation rule: an error message naming the flags and the fix, or None."""
