"""Autograd collectives of tensor and sequence parallelism: one small function per communication pattern.

"TP region" = the last dimension is split over the tensor-parallel group; "sequence-parallel region" = dimension 0
(the sequence, activations are [s, b, h]) is split over it. Every function is the identity on a group of one rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite import comm


def _size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim`."""
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {size}")
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`."""
    size = _size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((size * moved.shape[0], *moved.shape[1:]))
    comm.all_gather_into_tensor(out, moved, group)
    return out.movedim(0, dim)


def _reduce_scatter0(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over the group, keep this rank's chunk of dimension 0."""
    size = _size(group)
    if x.shape[0] % size:
        raise ValueError(f"dimension 0 of size {x.shape[0]} is not divisible by the group size {size}")
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    return comm.reduce_scatter_tensor(out, x.contiguous(), group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return comm.all_reduce(x.contiguous().clone(), group)


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """forward: identity; backward: all-reduce the gradient over the TP group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """forward: all-reduce over the TP group; backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    """forward: keep this rank's chunk of the last dimension; backward: all-gather the last dimension."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1, ctx.group), None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    """forward: all-gather the last dimension over the TP group; backward: keep this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """forward: keep this rank's chunk of dimension 0; backward: all-gather dimension 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """forward: all-gather dimension 0; backward: reduce-scatter dimension 0 when the consumer is tensor-parallel
    (each rank holds a partial gradient), else keep this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return _gather(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter0(grad, ctx.group), None, None
        return _split(grad, 0, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """forward: reduce-scatter dimension 0 over the TP group; backward: all-gather dimension 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    """forward: all-reduce (sum) over the group; backward: all-reduce (sum) of the gradient over the group.

    For a statistic summed over ranks that every rank then uses in its own, different terms of the loss (e.g. a
    per-sequence mean over the CP shards of the sequence): each rank's part receives every rank's gradient.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _ScatterToTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup, grad_is_partial: bool = True
) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherFromSequenceParallelRegion.apply(x, group, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, group)


def sum_over_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum of `x` over the ranks of `group` when each rank's loss uses the sum (see `_AllReduceSum`)."""
    return x if _size(group) == 1 else _AllReduceSum.apply(x, group)
