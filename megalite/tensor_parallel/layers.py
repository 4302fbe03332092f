"""Tensor-parallel layers: vocab-parallel embedding, column- and row-parallel linear, with or without sequence
parallelism. Activations are [s, b, h]; with sequence parallelism the sequence dimension is split over the TP group
outside these layers.

Each layer holds its model's `ModelContext` and reads sequence parallelism from its knobs at every call (a caller
may switch it off for one forward). The linear layers share one autograd function whose backward computes the input
gradient at once and the weight gradient either at once or, while the context defers weight gradients (a split
backward), as work queued for the pipeline's W pass.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.tensor_parallel import mappings
from megalite.tensor_parallel.sharding import ShardSpec, set_spec

if TYPE_CHECKING:
    from megalite.context import ModelContext


def sequence_parallel(context: ModelContext, group: dist.ProcessGroup) -> bool:
    """Whether activations are split along the sequence over `group` in this call: the knob, and TP > 1."""
    return context.knobs.sequence_parallel and dist.get_world_size(group) > 1


class _LinearFunction(torch.autograd.Function):
    """y = gather(x) @ W^T + b, where gather is the sequence-parallel all-gather of dimension 0 (or nothing).

    forward: all-gather x over `sp_group` if given, then the local matmul; only the local x is saved.
    backward: dx = dy @ W, reduce-scattered over `sp_group` if given; dW = dy^T @ gather(x), db = sum(dy),
    computed now, or queued on the context (the W pass returns them as (parameter, gradient) pairs). Computed now in
    fp32 under a gradient reducer, dW is accumulated straight into the parameter's main gradient (`grad_sink`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sp_group, context):
        ctx.sp_group, ctx.context = sp_group, context
        ctx.has_bias = bias is not None
        # the parameters themselves, for the deferred W pass: under activation checkpointing, saved tensors come
        # back as detached copies, and a gradient accumulated into one would be lost
        ctx.weight_param, ctx.bias_param = weight, bias
        ctx.save_for_backward(x, weight)
        total = mappings._gather(x, 0, sp_group) if sp_group is not None else x
        return F.linear(total, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        sp_group = ctx.sp_group
        grad_input = grad.matmul(weight)
        if sp_group is not None:
            grad_input = mappings._reduce_scatter0(grad_input, sp_group)

        def operands() -> tuple[torch.Tensor, torch.Tensor]:
            """dy and gather(x) as [tokens, out] and [tokens, in]: dW = dy^T gather(x)."""
            total = mappings._gather(x, 0, sp_group) if sp_group is not None else x
            return grad.reshape(-1, grad.shape[-1]), total.reshape(-1, total.shape[-1])

        def weight_grads() -> tuple[torch.Tensor, torch.Tensor | None]:
            g2, total = operands()
            return g2.t().matmul(total), (g2.sum(0) if ctx.has_bias else None)

        weight_param, bias_param = ctx.weight_param, ctx.bias_param
        queue = ctx.context.weight_grad_queue
        if not weight_param.requires_grad:
            return grad_input, None, None, None, None
        if queue is None:
            sink = ctx.context.grad_sink
            if sink is not None and grad.dtype == torch.float32:  # fp32: accumulate into the main gradient
                g2, total = operands()
                if sink(weight_param, lambda main: main.addmm_(g2.t(), total)):
                    return grad_input, None, (g2.sum(0) if ctx.has_bias else None), None, None
            grad_weight, grad_bias = weight_grads()
            return grad_input, grad_weight, grad_bias, None, None

        @torch.no_grad()
        def deferred() -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
            grad_weight, grad_bias = weight_grads()
            return [(weight_param, grad_weight)] + ([(bias_param, grad_bias)] if grad_bias is not None else [])

        queue.append(deferred)
        return grad_input, None, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, context: ModelContext,
           sp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """x @ W^T + b through `_LinearFunction` (sequence-parallel gather of x when `sp_group` is given)."""
    if sp_group is not None and dist.get_world_size(sp_group) == 1:
        sp_group = None
    if sp_group is None and not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return _LinearFunction.apply(x, weight, bias, sp_group, context)


def column_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup,
    context: ModelContext,
) -> torch.Tensor:
    """x [s, b, in] (or [s/t, b, in] with sequence parallelism) times this rank's rows of the weight."""
    if sequence_parallel(context, group):
        return linear(x, weight, bias, context, group)
    return linear(mappings.copy_to_tensor_parallel_region(x, group), weight, bias, context)


class ColumnParallelLinear(torch.nn.Module):
    """y = x A^T + b with A's output dimension split over the TP group: rank i computes y_i = x A_i^T + b_i.

    Input: [s, b, in] replicated (or [s/t, b, in] with sequence parallelism, all-gathered inside).
    Output: [s, b, out/t], or [s, b, out] with `gather_output`. `stride` > 1 shards each of `stride` stacked
    blocks of the output dimension separately (SwiGLU's [gate; up]). `logical_rows` is how checkpoints see the
    output dimension (e.g. the fused QKV rows as [query groups, heads per group + 2, head size]).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: dist.ProcessGroup,
        context: ModelContext,
        *,
        bias: bool = True,
        gather_output: bool = False,
        std: float = 0.02,
        stride: int = 1,
        logical_rows: tuple[int, ...] | None = None,
    ):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if out_features % (size * stride):
            raise ValueError(f"output features {out_features} not divisible by TP size {size} x stride {stride}")
        self.group, self.context, self.gather_output = group, context, gather_output
        w = ShardSpec((out_features, in_features), dim=0, rank=rank, size=size, stride=stride, std=std,
                      logical_shape=None if logical_rows is None else (*logical_rows, in_features))
        self.weight = set_spec(torch.nn.Parameter(torch.empty(w.local_shape)), w)
        self.bias = None
        if bias:
            b = ShardSpec((out_features,), dim=0, rank=rank, size=size, stride=stride, init="zeros",
                          logical_shape=logical_rows)
            self.bias = set_spec(torch.nn.Parameter(torch.empty(b.local_shape)), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = column_parallel_linear(x, self.weight, self.bias, self.group, self.context)
        return mappings.gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(torch.nn.Module):
    """y = x A^T + b with A's input dimension split over the TP group: y = sum_i x_i A_i^T, then + b.

    Input: [s, b, in/t] (already split, e.g. a column-parallel output). Output: [s, b, out] all-reduced, or
    [s/t, b, out] reduce-scattered with sequence parallelism.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: dist.ProcessGroup,
        context: ModelContext,
        *,
        bias: bool = True,
        std: float = 0.02,
    ):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if in_features % size:
            raise ValueError(f"input features {in_features} not divisible by TP size {size}")
        self.group, self.context = group, context
        w = ShardSpec((out_features, in_features), dim=1, rank=rank, size=size, std=std)
        self.weight = set_spec(torch.nn.Parameter(torch.empty(w.local_shape)), w)
        self.bias = None
        if bias:
            # under sequence parallelism each TP rank adds the bias to other tokens: gradients summed over TP
            replicated = ("tp",) if sequence_parallel(context, group) else ()
            b = ShardSpec((out_features,), init="zeros", replicated_over=replicated)
            self.bias = set_spec(torch.nn.Parameter(torch.empty(out_features)), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, None, self.context)
        if sequence_parallel(self.context, self.group):
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = mappings.reduce_from_tensor_parallel_region(y, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table with the vocabulary split over the TP group; each rank looks up the ids it owns.

    Input ids [s, b]; output [s, b, h] all-reduced, or [s/t, b, h] reduce-scattered with sequence parallelism.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup, context: ModelContext, *,
        std: float = 0.02,
    ):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if num_embeddings % size:
            raise ValueError(f"vocabulary {num_embeddings} not divisible by TP size {size}")
        self.group, self.context = group, context
        self.per_rank = num_embeddings // size
        self.start = rank * self.per_rank
        w = ShardSpec((num_embeddings, embedding_dim), dim=0, rank=rank, size=size, std=std)
        self.weight = set_spec(torch.nn.Parameter(torch.empty(w.local_shape)), w)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if dist.get_world_size(self.group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            local = ids - self.start
            outside = (local < 0) | (local >= self.per_rank)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if sequence_parallel(self.context, self.group):
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mappings.reduce_from_tensor_parallel_region(out, self.group)
