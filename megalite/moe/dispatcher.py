"""Token dispatchers: (token, expert) pairs to the ranks holding the experts, and the expert outputs back.

`TokenDispatcher` fixes the phases, as Megatron-Core names them, so another dispatcher (or one that overlaps its
communication with computation) replaces single phases:

    dispatch = dispatch_preprocess -> token_dispatch -> dispatch_postprocess
    combine  = combine_preprocess  -> token_combine  -> combine_postprocess   (the mirror image)

`AllToAllDispatcher`:
- dispatch_preprocess: the kept (token, expert) pairs sorted by global expert (experts are laid out contiguously over
  the EP ranks, so this also groups them by destination rank), one row of the token per pair; then counts first: the
  per-expert counts all-gathered over the EP group (E integers per rank), which gives every rank both its send and
  its receive splits, and, with ETP > 1, over the ETP group;
- token_dispatch: the rows all-to-all'ed over the EP group with those uneven splits, then (ETP > 1) all-gathered
  unevenly inside the ETP group, since every ETP rank holds a slice of every local expert;
- dispatch_postprocess: the received rows sorted by local expert (they arrive as [ETP source][EP source][local
  expert] blocks).
combine undoes these in reverse: the local-expert sort, the ETP gather (a reduce-scatter: the ETP ranks' partial
outputs are summed) and the all-to-all, and the permutation with the routing weights applied (Megatron-Core's
unpermute with probs): each token's output [T, h] is the weighted sum of its kept pairs' rows, one `index_add` (its
backward a gather), and dropped pairs add nothing. Nothing is kept on the dispatcher between the calls (the state
travels in `DispatchState`), so several microbatches may be in flight.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite import comm
from megalite.moe.collectives import all_gather_rows, all_to_all, reduce_scatter_rows
from megalite.parallel_state import ProcessGroups


@dataclass
class DispatchState:
    """What the later phases of a dispatch, and its combine, need."""

    num_tokens: int
    topk: int
    pair_ids: torch.Tensor
    """The kept (token, slot) pairs, flat as token x k + slot, in dispatch order (row i of the dispatched rows is
    pair `pair_ids[i]`)."""
    send_splits: list[int]
    """Rows sent to each EP rank."""
    recv_splits: list[int]
    """Rows received from each EP rank."""
    etp_sizes: list[int]
    """Rows received by each ETP rank (over EP)."""
    arrivals: torch.Tensor
    """Rows from each [ETP source, EP source, local expert] block, in arrival order."""
    unsort: torch.Tensor | None = None
    """Permutation from local-expert order back to arrival order (set by `dispatch_postprocess`; None when the
    arrival order is the local-expert order: one EP and one ETP rank)."""


class TokenDispatcher(ABC):
    """The phases of a token dispatcher (see the module docstring); `dispatch` and `combine` run them in order."""

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[int], DispatchState]:
        """Tokens x [T, h] and their experts [T, k] (pairs with `keep` False stay home) -> the rows for this rank's
        local experts [M, h], sorted by local expert, the rows per local expert, and the state for `combine`."""
        rows, state = self.dispatch_preprocess(x, indices, keep)
        rows = self.token_dispatch(rows, state)
        rows, tokens_per_expert = self.dispatch_postprocess(rows, state)
        return rows, tokens_per_expert, state

    def combine(self, y: torch.Tensor, state: DispatchState, weights: torch.Tensor) -> torch.Tensor:
        """Expert outputs [M, h] in `dispatch`'s order and the routing weights [T, k] -> [T, h]: per token, the sum
        of its kept pairs' outputs times their weights."""
        return self.combine_postprocess(self.token_combine(self.combine_preprocess(y, state), state), state, weights)

    @abstractmethod
    def dispatch_preprocess(self, x: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None
                            ) -> tuple[torch.Tensor, DispatchState]:
        """Local work before communication: the rows to send, and the state (splits) of this dispatch."""

    @abstractmethod
    def token_dispatch(self, rows: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """The communication that brings every row to the ranks computing its expert."""

    @abstractmethod
    def dispatch_postprocess(self, rows: torch.Tensor, state: DispatchState) -> tuple[torch.Tensor, list[int]]:
        """Local work after communication: rows grouped by local expert, and the count per local expert."""

    @abstractmethod
    def combine_preprocess(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Undo `dispatch_postprocess`: expert outputs back in arrival order."""

    @abstractmethod
    def token_combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Undo `token_dispatch`: every output row back to the rank of its token."""

    @abstractmethod
    def combine_postprocess(self, y: torch.Tensor, state: DispatchState, weights: torch.Tensor) -> torch.Tensor:
        """Undo `dispatch_preprocess`: the rows, times their pairs' weights [T, k], summed per token: [T, h]."""


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum of y[i] x weights[pair i] over the rows i of token t's kept pairs: rows y [M, h] in dispatch
    order, weights [T, k], `pair_ids` [M] (pair = token x k + slot) -> [T, h]. Keeps y, its rows' weights and the
    pair ids for backward (an autograd `index_add` would also keep the weighted [M, h] product). On CUDA the order
    in which a token's rows are added is not fixed for top-k > 2 (atomics; at k <= 2 the sum is the same either way)
    unless `torch.use_deterministic_algorithms(True)`, under which torch's `index_add` is deterministic."""

    @staticmethod
    def forward(ctx, y, weights, pair_ids):
        row_weights = weights.reshape(-1).index_select(0, pair_ids).to(y.dtype)
        ctx.save_for_backward(y, row_weights, pair_ids)
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        out = y.new_zeros((weights.shape[0], *y.shape[1:]))
        return out.index_add_(0, pair_ids // weights.shape[1], y * row_weights.unsqueeze(-1))

    @staticmethod
    def backward(ctx, grad):
        y, row_weights, pair_ids = ctx.saved_tensors
        shape = ctx.weights_shape
        rows_grad = grad.index_select(0, pair_ids // shape[1])
        weights_grad = None
        if ctx.needs_input_grad[1]:
            weights_grad = torch.zeros(shape.numel(), dtype=ctx.weights_dtype, device=grad.device)
            weights_grad[pair_ids] = (rows_grad * y).sum(-1).to(ctx.weights_dtype)
            weights_grad = weights_grad.view(shape)
        return rows_grad.mul_(row_weights.unsqueeze(-1)), weights_grad, None


def _all_gather_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[group size, *counts.shape]: every rank's counts (not differentiable)."""
    n = dist.get_world_size(group)
    if n == 1:
        return counts.unsqueeze(0)
    out = counts.new_empty((n * counts.shape[0], *counts.shape[1:]))
    comm.all_gather_into_tensor(out, counts, group)
    return out.view(n, *counts.shape)


class AllToAllDispatcher(TokenDispatcher):
    """Sends tokens to the local experts of the EP ranks (and the ETP ranks beside them), and the outputs back."""

    def __init__(self, num_experts: int, groups: ProcessGroups):
        self.ep_group, self.etp_group = groups.ep, groups.etp
        self.ep_size = dist.get_world_size(groups.ep)
        if num_experts % self.ep_size:
            raise ValueError(f"--num-experts {num_experts} is not divisible by the EP size {self.ep_size}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.first_local = dist.get_rank(groups.ep) * self.num_local
        self.alone = self.ep_size == 1 and dist.get_world_size(groups.etp) == 1
        """No EP and no ETP: the dispatch exchanges nothing (its phases skip the collectives and sorts)."""

    def dispatch_preprocess(self, x: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None
                            ) -> tuple[torch.Tensor, DispatchState]:
        num_tokens, topk = indices.shape
        experts = indices.reshape(-1)
        pair_ids = torch.arange(experts.numel(), device=x.device)
        if keep is not None:
            pair_ids = pair_ids[keep.reshape(-1)]
        pair_ids = pair_ids[torch.argsort(experts[pair_ids], stable=True)]
        # index_select, not x[...]: its backward is an index_add_ (as deterministic as the combine: see
        # _WeightedCombine), not the slower accumulating index_put_
        rows = x.index_select(0, pair_ids // topk)
        counts = torch.bincount(experts[pair_ids], minlength=self.num_experts)
        if self.alone:  # one EP and one ETP rank: nothing to exchange
            m = [pair_ids.numel()]
            return rows, DispatchState(num_tokens, topk, pair_ids, m, m, m, counts.view(1, 1, -1))
        local = slice(self.first_local, self.first_local + self.num_local)
        from_each_ep = _all_gather_counts(counts, self.ep_group)[:, local]
        arrivals = _all_gather_counts(from_each_ep.contiguous(), self.etp_group)  # [etp, ep, local experts]
        state = DispatchState(
            num_tokens, topk, pair_ids, send_splits=counts.view(self.ep_size, self.num_local).sum(1).tolist(),
            recv_splits=from_each_ep.sum(1).tolist(), etp_sizes=arrivals.sum((1, 2)).tolist(), arrivals=arrivals,
        )
        return rows, state

    def token_dispatch(self, rows: torch.Tensor, state: DispatchState) -> torch.Tensor:
        if self.alone:
            return rows
        rows = all_to_all(rows, self.ep_group, state.recv_splits, state.send_splits)
        return all_gather_rows(rows, self.etp_group, state.etp_sizes)

    def dispatch_postprocess(self, rows: torch.Tensor, state: DispatchState) -> tuple[torch.Tensor, list[int]]:
        if self.alone:  # the rows are already in local-expert order
            return rows, state.arrivals[0, 0].tolist()
        blocks = state.arrivals.reshape(-1)
        local_expert = torch.arange(self.num_local, device=rows.device).repeat(blocks.numel() // self.num_local)
        sort = torch.argsort(torch.repeat_interleave(local_expert, blocks), stable=True)
        state.unsort = torch.argsort(sort)
        return rows.index_select(0, sort), state.arrivals.sum((0, 1)).tolist()

    def combine_preprocess(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return y if state.unsort is None else y.index_select(0, state.unsort)

    def token_combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        if self.alone:
            return y
        y = reduce_scatter_rows(y, self.etp_group, state.etp_sizes)
        return all_to_all(y, self.ep_group, state.send_splits, state.recv_splits)

    def combine_postprocess(self, y: torch.Tensor, state: DispatchState, weights: torch.Tensor) -> torch.Tensor:
        return _WeightedCombine.apply(y, weights, state.pair_ids)
