"""Ring attention over the context-parallel group, on zigzag-sharded sequences.

Each CP rank holds its zigzag shard (chunks r and 2cp-1-r of the sequence, each of length c) of q, k and v.

p2p (ring, default). Forward: the K/V block ([2, b, hkv, 2c, d], one message) travels around the ring, sent to the
next rank while the current block is computed; cp-1 sends per rank. At step i a rank holds the K/V of rank
j = (r - i) mod cp and, under causal masking:
  j == r: its two query chunks attend causally to its own two chunks (the diagonal block);
  j <  r: both query chunks attend fully to chunk j, the first half of the received block;
  j >  r: only the second query chunk (2cp-1-r) attends fully to the whole received block;
so every step after the first computes the same 2c^2 scores (half a block) on every rank. Partial results are
merged in fp32 with their log-sum-exp. Backward: K/V travel the same way; each block's gradients are recomputed
from the final out and lse; dQ stays local, and dK/dV (in fp32) travel one step behind their block, collecting
every rank's contribution, back to the owner: (cp-1) K/V sends plus (cp-1) dK/dV sends per rank.

all_gather. Forward: K/V are gathered once (all-gather over the CP group) and kept for the backward; each local
query chunk attends to its causal prefix. Backward: dK/dV of the full sequence are reduce-scattered (fp32) back to
the zigzag owners.

Documents (--reset-attention-mask): with per-token document ids, every rank's ids are all-gathered once ([b, 2c]
integers per rank) and each block is masked to the pairs in the same document (and causal on the diagonal); a block
the mask leaves empty is skipped, and a query row with no key in a block takes no part in that block's merge.

`ring_attention_comm_bytes` gives the bytes each rank sends and receives, for comparison with `comm.count_comm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite import comm
from megalite.backends.attention import (
    accumulation_dtype,
    attention_backward_with_lse,
    attention_forward_with_lse,
    document_mask,
)
from megalite.context_parallel.zigzag import zigzag_chunks, zigzag_shard, zigzag_unshard

COMM_TYPES = ("p2p", "all_gather")

Block = tuple[slice, slice, bool]
"""Rows of the local queries, rows of the keys they attend, and whether the block is causal (diagonal)."""


@dataclass(frozen=True)
class _Ring:
    """The CP group seen from this rank: its index and its neighbours' global ranks."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next(self) -> int:
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]


def _merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
                rows: slice) -> None:
    """Merge a block's partial (out, lse) into the running fp32 (out, lse) on `rows`, in place.

    lse = logaddexp(lse, block_lse); out = out * exp(old lse - lse) + block_out * exp(block_lse - lse).
    """
    old = lse[..., rows]
    new = torch.logaddexp(old, block_lse.to(lse.dtype))
    finite = new.masked_fill(new == float("-inf"), 0.0)  # rows with no key yet stay (0, -inf)
    out[..., rows, :] = (out[..., rows, :] * torch.exp(old - finite).unsqueeze(-1)
                         + block_out.to(out.dtype) * torch.exp(block_lse - finite).unsqueeze(-1))
    lse[..., rows] = new


def _empty_out_lse(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(q.dtype)
    return torch.zeros(q.shape, dtype=acc, device=q.device), torch.full(q.shape[:-1], float("-inf"), dtype=acc,
                                                                        device=q.device)


# ------------------------------------------------------------------------------------------------------- p2p ring
def ring_block(cp_rank: int, kv_rank: int, chunk: int, causal: bool) -> Block:
    """Which local query rows attend which rows of the K/V block of `kv_rank`, under zigzag sharding."""
    both = slice(0, 2 * chunk)
    if not causal:
        return both, both, False
    if kv_rank == cp_rank:
        return both, both, True
    if kv_rank < cp_rank:
        return both, slice(0, chunk), False
    return slice(chunk, 2 * chunk), both, False


def _block_mask(documents_q: torch.Tensor | None, documents_k: torch.Tensor | None, rows: slice, cols: slice,
                causal: bool) -> torch.Tensor | None:
    """The document mask [b, 1, rows, cols] of a block (causal on the diagonal), or None without documents."""
    if documents_q is None:
        return None
    return document_mask(documents_q[:, rows], documents_k[:, cols], causal)


def _p2p_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: _Ring, causal: bool,
                 scale: float, documents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = q.size(2) // 2
    out, lse = _empty_out_lse(q)
    kv = torch.stack([k, v])
    for step in range(ring.size):
        requests, kv_next = [], None
        if step < ring.size - 1:
            kv_next = torch.empty_like(kv)
            requests = comm.batch_isend_irecv([(kv, ring.next)], [(kv_next, ring.prev)], ring.group)
        owner = (ring.rank - step) % ring.size
        rows, cols, block_causal = ring_block(ring.rank, owner, chunk, causal)
        mask = _block_mask(*_documents_of(documents, ring.rank, owner), rows, cols, block_causal)
        if mask is None or mask.any():
            block_out, block_lse = attention_forward_with_lse(
                q[..., rows, :], kv[0][..., cols, :], kv[1][..., cols, :], causal=block_causal and mask is None,
                scale=scale, mask=mask,
            )
            _merge_into(out, lse, block_out, block_lse, rows)
        comm.wait_all(requests, ring.group)
        kv = kv_next
    return out.to(q.dtype), lse


def _documents_of(documents: torch.Tensor | None, rank: int, owner: int
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(this rank's document ids, those of the K/V block of `owner`) from every rank's [cp, b, 2c], or Nones."""
    return (None, None) if documents is None else (documents[rank], documents[owner])


def _p2p_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, ring: _Ring, causal: bool, scale: float,
                  documents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chunk, acc = q.size(2) // 2, accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    own_dkv = passing_dkv = None  # dK/dV of this rank's block; dK/dV of the previous step's block, to pass on
    for step in range(ring.size):
        sends, recvs, kv_next, dkv_in = [], [], None, None
        if step < ring.size - 1:
            kv_next = torch.empty_like(kv)
            sends, recvs = [(kv, ring.next)], [(kv_next, ring.prev)]
        if step >= 2:  # the previous step's block goes on; the block held now arrives with the others' share
            dkv_in = torch.empty_like(passing_dkv)
            sends.append((passing_dkv, ring.next))
            recvs.append((dkv_in, ring.prev))
        requests = comm.batch_isend_irecv(sends, recvs, ring.group)
        owner = (ring.rank - step) % ring.size
        rows, cols, block_causal = ring_block(ring.rank, owner, chunk, causal)
        mask = _block_mask(*_documents_of(documents, ring.rank, owner), rows, cols, block_causal)
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        if mask is None or mask.any():
            block_dq, block_dk, block_dv = attention_backward_with_lse(
                dout[..., rows, :], q[..., rows, :], kv[0][..., cols, :], kv[1][..., cols, :], out[..., rows, :],
                lse[..., rows], causal=block_causal and mask is None, scale=scale, mask=mask,
            )
            dq[..., rows, :] += block_dq
            dkv[0][..., cols, :] = block_dk
            dkv[1][..., cols, :] = block_dv
        comm.wait_all(requests, ring.group)
        if dkv_in is not None:
            dkv += dkv_in
        if step == 0:
            own_dkv = dkv
        else:
            passing_dkv = dkv
        kv = kv_next
    if ring.size > 1:  # the last block held is the next rank's: its dK/dV, now complete, goes home
        dkv_in = torch.empty_like(passing_dkv)
        comm.wait_all(comm.batch_isend_irecv([(passing_dkv, ring.next)], [(dkv_in, ring.prev)], ring.group),
                      ring.group)
        own_dkv += dkv_in
    return dq.to(q.dtype), own_dkv[0].to(k.dtype), own_dkv[1].to(v.dtype)


class _RingAttentionP2P(torch.autograd.Function):
    """forward: K/V blocks around the CP ring (cp-1 sends per rank); backward: K/V around the ring again, dK/dV
    following their block back to the owner (cp-1 sends each per rank)."""

    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, causal: bool, scale: float, documents: torch.Tensor | None):
        out, lse = _p2p_forward(q, k, v, ring, causal, scale, documents)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.documents = ring, causal, scale, documents
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = _p2p_backward(dout, *ctx.saved_tensors, ctx.ring, ctx.causal, ctx.scale, ctx.documents)
        return dq, dk, dv, None, None, None, None


# ------------------------------------------------------------------------------------------------------ all-gather
def prefix_blocks(cp_rank: int, cp_size: int, chunk: int, causal: bool) -> list[Block]:
    """Blocks of the local queries against the full gathered K/V: each chunk's diagonal and its causal prefix."""
    if not causal:
        return [(slice(0, 2 * chunk), slice(0, 2 * cp_size * chunk), False)]
    blocks = []
    for local, index in enumerate(zigzag_chunks(cp_rank, cp_size)):
        rows = slice(local * chunk, (local + 1) * chunk)
        blocks.append((rows, slice(index * chunk, (index + 1) * chunk), True))
        if index > 0:
            blocks.append((rows, slice(0, index * chunk), False))
    return blocks


def _gather_kv(k: torch.Tensor, v: torch.Tensor, ring: _Ring) -> torch.Tensor:
    """Full-sequence [2, b, hkv, s, d] K/V from every rank's zigzag shard (one all-gather)."""
    kv = torch.stack([k, v]).unsqueeze(0)
    gathered = torch.empty((ring.size, *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
    comm.all_gather_into_tensor(gathered, kv, ring.group)
    return zigzag_unshard(list(gathered.unbind(0)), dim=-2)


def _scatter_dkv(dkv: torch.Tensor, ring: _Ring) -> torch.Tensor:
    """Sum the full-sequence dK/dV [2, b, hkv, s, d] over ranks; keep this rank's zigzag shard (reduce-scatter)."""
    shards = torch.stack([zigzag_shard(dkv, -2, j, ring.size) for j in range(ring.size)])
    mine = torch.empty((1, *shards.shape[1:]), dtype=dkv.dtype, device=dkv.device)
    comm.reduce_scatter_tensor(mine, shards, ring.group)
    return mine[0]


class _AllGatherAttention(torch.autograd.Function):
    """forward: all-gather K/V over the CP group (kept for the backward); backward: reduce-scatter dK/dV (fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, causal: bool, scale: float, documents: torch.Tensor | None):
        kv = _gather_kv(k, v, ring)
        full = None if documents is None else zigzag_unshard(list(documents.unbind(0)), dim=1)
        mine = None if documents is None else documents[ring.rank]
        out, lse = _empty_out_lse(q)
        for rows, cols, block_causal in prefix_blocks(ring.rank, ring.size, q.size(2) // 2, causal):
            mask = _block_mask(mine, full, rows, cols, block_causal)
            if mask is None or mask.any():
                block_out, block_lse = attention_forward_with_lse(
                    q[..., rows, :], kv[0][..., cols, :], kv[1][..., cols, :], causal=block_causal and mask is None,
                    scale=scale, mask=mask,
                )
                _merge_into(out, lse, block_out, block_lse, rows)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.documents = ring, causal, scale, (mine, full)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        ring, acc = ctx.ring, accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        for rows, cols, block_causal in prefix_blocks(ring.rank, ring.size, q.size(2) // 2, ctx.causal):
            mask = _block_mask(*ctx.documents, rows, cols, block_causal)
            if mask is not None and not mask.any():
                continue
            block_dq, block_dk, block_dv = attention_backward_with_lse(
                dout[..., rows, :], q[..., rows, :], kv[0][..., cols, :], kv[1][..., cols, :], out[..., rows, :],
                lse[..., rows], causal=block_causal and mask is None, scale=ctx.scale, mask=mask,
            )
            dq[..., rows, :] += block_dq
            dkv[0][..., cols, :] += block_dk
            dkv[1][..., cols, :] += block_dv
        mine = _scatter_dkv(dkv, ring)
        return dq.to(q.dtype), mine[0].to(kv.dtype), mine[1].to(kv.dtype), None, None, None, None


# -------------------------------------------------------------------------------------------------------- public
def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup, group_ranks: list[int],
    causal: bool = True, scale: float | None = None, comm_type: str = "p2p", documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable attention of this CP rank's zigzag shard against the whole sequence; returns the local output.

    q [b, hq, 2c, d], k and v [b, hkv, 2c, d] are this rank's zigzag shards (c = s / (2 cp)); `group_ranks` are
    the CP group's global ranks in ring order. comm_type 'p2p' (ring) or 'all_gather'. With one CP rank this is
    plain attention with no communication. `documents` [b, 2c]: this shard's document ids (ids of the whole
    sequence, sharded like the tokens): attention stays inside each document.
    """
    if comm_type not in COMM_TYPES:
        raise ValueError(f"unknown --cp-comm-type {comm_type!r}; choose one of {', '.join(COMM_TYPES)}")
    if dist.get_rank() not in group_ranks:
        raise ValueError(f"this rank ({dist.get_rank()}) is not in the context-parallel group {group_ranks}")
    if q.dim() != 4 or q.size(2) % 2 or k.shape != v.shape or k.size(2) != q.size(2):
        raise ValueError(
            f"ring attention expects zigzag shards q [b, hq, 2c, d], k and v [b, hkv, 2c, d]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    ring = _Ring(group, tuple(group_ranks), list(group_ranks).index(dist.get_rank()))
    scale = q.size(-1) ** -0.5 if scale is None else scale
    function = _AllGatherAttention if comm_type == "all_gather" and ring.size > 1 else _RingAttentionP2P
    every = None
    if documents is not None:  # every rank's ids: [cp, b, 2c]
        every = documents.unsqueeze(0)
        if ring.size > 1:
            every = documents.new_empty((ring.size * documents.shape[0], *documents.shape[1:]))
            comm.all_gather_into_tensor(every, documents.contiguous(), ring.group)
            every = every.view(ring.size, *documents.shape)
    return function.apply(q, k, v, ring, causal, scale, every)


def ring_attention_comm_bytes(
    k_shard_shape: tuple[int, ...], dtype: torch.dtype, cp_size: int, comm_type: str
) -> dict[str, dict[str, int]]:
    """Bytes per rank and layer that `ring_attention` moves, by phase ('forward', 'backward') and collective kind.

    With KV = bytes of one rank's K and V shards (2 * b * hkv * 2c * d * element size) and dKV the same in the
    fp32 (at least) accumulation dtype:
      p2p:        forward  send = recv = (cp-1) KV;  backward send = recv = (cp-1) (KV + dKV)
      all_gather: forward  all_gather input = KV;    backward reduce_scatter input = cp dKV
    Nothing moves with one CP rank. Kinds and byte conventions are those of `comm.count_comm`.
    """
    if comm_type not in COMM_TYPES:
        raise ValueError(f"unknown --cp-comm-type {comm_type!r}; choose one of {', '.join(COMM_TYPES)}")
    numel = 2 * torch.Size(k_shard_shape).numel()
    kv = numel * dtype.itemsize
    dkv = numel * accumulation_dtype(dtype).itemsize
    if cp_size == 1:
        return {"forward": {}, "backward": {}}
    if comm_type == "p2p":
        fwd, bwd = (cp_size - 1) * kv, (cp_size - 1) * (kv + dkv)
        return {"forward": {"send": fwd, "recv": fwd}, "backward": {"send": bwd, "recv": bwd}}
    return {"forward": {"all_gather": kv}, "backward": {"reduce_scatter": cp_size * dkv}}
