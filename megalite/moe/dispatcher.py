"""The all-to-all token dispatcher: (token, expert) pairs to the ranks holding the experts, and back.

dispatch:
1. permute: the kept (token, expert) pairs sorted by global expert (experts are laid out contiguously over the EP
   ranks, so this also groups them by destination rank); one row of the token per pair;
2. counts first: the per-expert counts all-gathered over the EP group (E integers per rank), which gives every rank
   both its send and its receive splits;
3. tokens: the rows all-to-all'ed over the EP group with those uneven splits;
4. with ETP > 1: the counts and then the rows all-gathered (unevenly) inside the ETP group, since every ETP rank holds
   a slice of every local expert;
5. the received rows sorted by local expert (they arrive as [ETP source][EP source][local expert] blocks).
combine undoes 5, 4 (a reduce-scatter: the ETP ranks' partial outputs are summed), 3 and 1, returning one row per
(token, expert) pair: [T, k, h], zero for dropped pairs. Nothing is kept on the dispatcher between the two calls
(the state travels in `DispatchState`), so several microbatches may be in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite import comm
from megalite.moe.collectives import all_gather_rows, reduce_scatter_rows
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import mappings


@dataclass
class DispatchState:
    """What `combine` needs to send a dispatch's rows back."""

    num_tokens: int
    topk: int
    row_of_pair: torch.Tensor
    """For each (token, slot) pair, flat as token x k + slot: its row in dispatch order, or the number of rows
    when the pair was dropped."""
    send_splits: list[int]
    """Rows sent to each EP rank."""
    recv_splits: list[int]
    """Rows received from each EP rank."""
    etp_sizes: list[int]
    """Rows received by each ETP rank (over EP)."""
    unsort: torch.Tensor
    """Permutation from local-expert order back to arrival order."""


def _all_gather_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[group size, *counts.shape]: every rank's counts (not differentiable)."""
    n = dist.get_world_size(group)
    if n == 1:
        return counts.unsqueeze(0)
    out = counts.new_empty((n * counts.shape[0], *counts.shape[1:]))
    comm.all_gather_into_tensor(out, counts, group)
    return out.view(n, *counts.shape)


class AllToAllDispatcher:
    """Sends tokens to the local experts of the EP ranks (and the ETP ranks beside them), and the outputs back."""

    def __init__(self, num_experts: int, groups: ProcessGroups):
        self.ep_group, self.etp_group = groups.ep, groups.etp
        self.ep_size = dist.get_world_size(groups.ep)
        if num_experts % self.ep_size:
            raise ValueError(f"--num-experts {num_experts} is not divisible by the EP size {self.ep_size}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.first_local = dist.get_rank(groups.ep) * self.num_local

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[int], DispatchState]:
        """Tokens x [T, h] and their experts [T, k] (pairs with `keep` False stay home) -> the rows for this rank's
        local experts [M, h], sorted by local expert, the rows per local expert, and the state for `combine`."""
        num_tokens, topk = indices.shape
        experts = indices.reshape(-1)
        pair_ids = torch.arange(experts.numel(), device=x.device)
        if keep is not None:
            pair_ids = pair_ids[keep.reshape(-1)]
        pair_ids = pair_ids[torch.argsort(experts[pair_ids], stable=True)]
        rows = x[pair_ids // topk]

        counts = torch.bincount(experts[pair_ids], minlength=self.num_experts)
        local = slice(self.first_local, self.first_local + self.num_local)
        from_each_ep = _all_gather_counts(counts, self.ep_group)[:, local]
        send_splits = counts.view(self.ep_size, self.num_local).sum(1).tolist()
        recv_splits = from_each_ep.sum(1).tolist()
        rows = mappings.all_to_all(rows, self.ep_group, recv_splits, send_splits)

        from_each = _all_gather_counts(from_each_ep.contiguous(), self.etp_group)  # [etp, ep, local experts]
        etp_sizes = from_each.sum((1, 2)).tolist()
        rows = all_gather_rows(rows, self.etp_group, etp_sizes)

        local_expert = torch.arange(self.num_local, device=x.device).repeat(from_each.shape[0] * self.ep_size)
        sort = torch.argsort(torch.repeat_interleave(local_expert, from_each.reshape(-1)), stable=True)
        row_of_pair = torch.full_like(experts, pair_ids.numel())
        row_of_pair[pair_ids] = torch.arange(pair_ids.numel(), device=x.device)
        state = DispatchState(num_tokens, topk, row_of_pair, send_splits, recv_splits, etp_sizes,
                              torch.argsort(sort))
        return rows[sort], from_each.sum((0, 1)).tolist(), state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Expert outputs [M, h] (partial sums over the ETP group, in `dispatch`'s order) -> [T, k, h] per
        (token, expert) pair, zero where the pair was dropped."""
        y = reduce_scatter_rows(y[state.unsort], self.etp_group, state.etp_sizes)
        y = mappings.all_to_all(y, self.ep_group, state.send_splits, state.recv_splits)
        # a gather from the rows plus one zero row for the dropped pairs: indexing keeps only the index for
        # backward (index_copy would keep the [M, h] rows too)
        y = torch.cat([y, y.new_zeros((1, *y.shape[1:]))])
        return y[state.row_of_pair].view(state.num_tokens, state.topk, *y.shape[1:])
