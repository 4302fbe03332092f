"""The token collectives of MoE: the all-to-all over the expert-parallel group, and the uneven all-gather /
reduce-scatter of token rows inside the expert-tensor-parallel group.

The EP all-to-all sends each rank's (token, expert) rows to the ranks holding those experts, with uneven splits.
After it each ETP rank holds a different number of rows; every ETP rank needs all of them (it holds a slice of every
local expert), and afterwards each needs back the sum of the partial outputs of its own rows. Both run as an
all-to-all with uneven splits (each rank's rows are sent to every rank, or each rank's slice is sent home).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite import comm


class _AllToAll(torch.autograd.Function):
    """forward: all-to-all of dimension 0 with uneven splits; backward: the reverse all-to-all (splits swapped)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        return comm.all_to_all_single(out, x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        comm.all_to_all_single(out, grad.contiguous(), ctx.group, ctx.input_splits, ctx.output_splits)
        return out, None, None, None


def _gather_rows(x: torch.Tensor, group: dist.ProcessGroup, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows, in rank order; rank i holds `sizes[i]` rows."""
    n = len(sizes)
    out = x.new_empty((sum(sizes), *x.shape[1:]))
    return comm.all_to_all_single(out, torch.cat([x] * n), group, sizes, [x.shape[0]] * n)


def _reduce_scatter_rows(x: torch.Tensor, group: dist.ProcessGroup, sizes: list[int]) -> torch.Tensor:
    """Rows `sizes[i]`-sliced to rank i, summed over the ranks."""
    n, mine = len(sizes), sizes[dist.get_rank(group)]
    out = x.new_empty((n * mine, *x.shape[1:]))
    comm.all_to_all_single(out, x, group, [mine] * n, sizes)
    return out.view(n, mine, *x.shape[1:]).sum(0)


class _AllGatherRows(torch.autograd.Function):
    """forward: all-gather of dimension 0 over `group` with `sizes[i]` rows from rank i; backward: the uneven
    reduce-scatter (each rank gets the sum of its rows' gradients)."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _gather_rows(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad.contiguous(), ctx.group, ctx.sizes), None, None


class _ReduceScatterRows(torch.autograd.Function):
    """forward: sum over `group`, rank i keeping its `sizes[i]` rows of dimension 0; backward: the uneven
    all-gather."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _reduce_scatter_rows(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad.contiguous(), ctx.group, ctx.sizes), None, None


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup, sizes: list[int]) -> torch.Tensor:
    """Differentiable uneven all-gather of dimension 0 (`sizes[i]` rows from rank i of `group`)."""
    return x if len(sizes) == 1 else _AllGatherRows.apply(x, group, list(sizes))


def reduce_scatter_rows(x: torch.Tensor, group: dist.ProcessGroup, sizes: list[int]) -> torch.Tensor:
    """Differentiable uneven reduce-scatter of dimension 0 (rank i of `group` keeps the sum of its `sizes[i]` rows)."""
    return x if len(sizes) == 1 else _ReduceScatterRows.apply(x, group, list(sizes))


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, output_splits: list[int], input_splits: list[int]
               ) -> torch.Tensor:
    """Differentiable all-to-all of dimension 0: send `input_splits[i]` rows to rank i, receive `output_splits[i]`."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, list(output_splits), list(input_splits))
