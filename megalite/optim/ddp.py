"""Gradient reduction over data parallelism, in buckets, overlapped with the backward pass.

Every parameter gets `main_grad`, an fp32 view into a flat bucket buffer, and gradients are accumulated there
across microbatches. Dense parameters are summed over the DP x CP group, expert parameters over the expert
data-parallel group (their `ShardSpec.data_parallel_group`).

Parameters replicated over groups that saw different data (norm weights under sequence parallelism, over TP) and
tied embedding copies (over the embedding group: first and last pipeline stage) need a sum over that group too.
They live in buckets of their own, summed over those groups first and then over data parallelism in `finish()`;
the other buckets, with `overlap`, start their reduction as soon as every gradient in them is final (during the
last microbatch's backward).

With `distributed` (the distributed optimizer, ZeRO-1), a bucket is reduce-scattered instead of all-reduced: each
rank of the data-parallel group receives the sum of its 1/g of the bucket, the part its optimizer updates
(`segments()`), and `gather_params()` all-gathers the updated weights afterwards.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megalite import comm
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel.sharding import get_spec


@dataclass(frozen=True)
class Segment:
    """Elements [start, end) of `param` (flattened) that this rank's optimizer updates; `grad` is their reduced
    fp32 gradient (a view into the bucket buffer)."""

    param: torch.nn.Parameter
    start: int
    end: int
    grad: torch.Tensor


@dataclass
class _Bucket:
    group_kind: str
    buffer: torch.Tensor
    params: list[torch.nn.Parameter]
    offsets: list[int]
    extra_sums: bool
    owned: tuple[int, int]
    """The range of `buffer` this rank's optimizer updates: all of it, or its 1/g with the distributed optimizer."""
    pending: set[int] = field(default_factory=set)
    request: dist.Work | None = None
    scattered: torch.Tensor | None = None


class GradReducer:
    """Owns the fp32 gradient buffers of `params` and reduces them over their data-parallel groups."""

    def __init__(self, params: list[torch.nn.Parameter], groups: ProcessGroups, *, bucket_size: int = 40_000_000,
                 overlap: bool = False, distributed: bool = False, tied_params: list[torch.nn.Parameter] = ()):
        self.groups, self.overlap, self.distributed = groups, overlap, distributed
        self.params = [p for p in params if p.requires_grad]
        self.tied_params = list(tied_params)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._final_pass = False
        by_key: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for p in reversed(self.params):  # roughly the order in which backward produces gradients
            by_key.setdefault((get_spec(p).data_parallel_group, bool(self._extra_groups(p))), []).append(p)
        for (kind, extra), members in by_key.items():
            chunk: list[torch.nn.Parameter] = []
            for p in members:
                chunk.append(p)
                if sum(q.numel() for q in chunk) >= bucket_size:
                    self._add_bucket(kind, extra, chunk)
                    chunk = []
            if chunk:
                self._add_bucket(kind, extra, chunk)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)
            p.on_deferred_grad = self._on_grad

    def _extra_groups(self, p: torch.nn.Parameter) -> list[dist.ProcessGroup]:
        """The groups besides data parallelism that `p`'s gradient is summed over."""
        out = [getattr(self.groups, kind) for kind in get_spec(p).replicated_over if self.groups.size(kind) > 1]
        if any(p is q for q in self.tied_params) and self.groups.embedding is not None \
                and self.groups.size("embedding") > 1:
            out.append(self.groups.embedding)
        return out

    def _add_bucket(self, kind: str, extra_sums: bool, params: list[torch.nn.Parameter]) -> None:
        device = params[0].device
        size = self.groups.size(kind)
        numel = sum(p.numel() for p in params)
        padded = -(-numel // size) * size if self.distributed else numel
        buffer = torch.zeros(padded, dtype=torch.float32, device=device)
        offsets, offset = [], 0
        for p in params:
            p.main_grad = buffer[offset : offset + p.numel()].view(p.shape)
            offsets.append(offset)
            offset += p.numel()
        if self.distributed:
            share = padded // size
            owned = (self.groups.rank(kind) * share, (self.groups.rank(kind) + 1) * share)
        else:
            owned = (0, numel)
        bucket = _Bucket(kind, buffer, params, offsets, extra_sums, owned)
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    @staticmethod
    def _owned_parts(bucket: _Bucket) -> Iterator[tuple[torch.nn.Parameter, int, int, int]]:
        """(param, its offset in the bucket, start, end) for every parameter part in the bucket's owned range."""
        lo, hi = bucket.owned
        for p, offset in zip(bucket.params, bucket.offsets):
            start, end = max(lo, offset) - offset, min(hi, offset + p.numel()) - offset
            if start < end:
                yield p, offset, start, end

    def segments(self) -> list[Segment]:
        """The parts of the parameters this rank's optimizer updates, in bucket order."""
        return [Segment(p, start, end, bucket.buffer[offset + start : offset + end])
                for bucket in self.buckets for p, offset, start, end in self._owned_parts(bucket)]

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if p.grad is None:  # a linear layer deferred this gradient to the W pass, which calls back later
            return
        p.main_grad.add_(p.grad)
        p.grad = None
        if self._final_pass:
            bucket = self._bucket_of[id(p)]
            bucket.pending.discard(id(p))
            if not bucket.pending and not bucket.extra_sums:
                self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        if bucket.request is not None or self.groups.size(bucket.group_kind) == 1:
            return
        group = getattr(self.groups, bucket.group_kind)
        if self.distributed:
            lo, hi = bucket.owned
            bucket.scattered = torch.empty(hi - lo, dtype=bucket.buffer.dtype, device=bucket.buffer.device)
            bucket.request = comm.reduce_scatter_tensor_async(bucket.scattered, bucket.buffer, group)
        else:
            bucket.request = comm.all_reduce_async(bucket.buffer, group)

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.request = None
        for p in self.params:
            p.grad = None

    def last_microbatch(self) -> None:
        """The next backward pass completes the gradients: start each bucket's reduction when it is ready."""
        if self.overlap:
            self._final_pass = True
            for bucket in self.buckets:
                bucket.pending = {id(p) for p in bucket.params}

    def finish(self) -> None:
        """Complete every reduction. Afterwards the `grad` of every segment is the gradient of the whole global
        batch (without the distributed optimizer: every `main_grad`)."""
        for bucket in self.buckets:
            if not bucket.extra_sums:
                self._start(bucket)
        for bucket in self.buckets:
            if bucket.extra_sums:
                for p in bucket.params:
                    for group in self._extra_groups(p):
                        comm.all_reduce(p.main_grad, group)
                self._start(bucket)
        for bucket in self.buckets:
            if bucket.request is not None:
                bucket.request.wait()
                bucket.request = None
            if bucket.scattered is not None:
                lo, hi = bucket.owned
                bucket.buffer[lo:hi].copy_(bucket.scattered)
                bucket.scattered = None
        self._final_pass = False

    @torch.no_grad()
    def gather_params(self) -> None:
        """Distributed optimizer: after each rank updated its segments, give every rank all updated weights."""
        if not self.distributed:
            return
        for bucket in self.buckets:
            size = self.groups.size(bucket.group_kind)
            if size == 1:
                continue
            lo, hi = bucket.owned
            mine = torch.zeros(hi - lo, dtype=bucket.params[0].dtype, device=bucket.buffer.device)
            for p, offset, start, end in self._owned_parts(bucket):
                mine[offset + start - lo : offset + end - lo].copy_(p.detach().reshape(-1)[start:end])
            full = torch.empty(bucket.buffer.numel(), dtype=mine.dtype, device=mine.device)
            comm.all_gather_into_tensor(full, mine, getattr(self.groups, bucket.group_kind))
            for p, offset in zip(bucket.params, bucket.offsets):
                p.copy_(full[offset : offset + p.numel()].view(p.shape))
