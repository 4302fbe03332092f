"""Gradient reduction over data parallelism, in buckets, overlapped with the backward pass.

Every parameter gets `main_grad`, an fp32 view into a flat bucket buffer, and gradients are accumulated there
across microbatches. Dense parameters are summed over the DP x CP group, expert parameters over the expert
data-parallel group (their `ShardSpec.data_parallel_group`).

Parameters replicated over groups that saw different data (norm weights under sequence parallelism, over TP) and
tied embedding copies (over the embedding group: first and last pipeline stage) need a sum over that group too.
They live in buckets of their own, summed over those groups first and then over data parallelism in `finish()`.

With `overlap`, every other bucket starts its reduction as soon as every gradient in it is final, whatever the
pipeline schedule. A gradient arrives as a contribution of one kind: "B" from autograd during a backward action
(`register_post_accumulate_grad_hook`; or, for fp32 weights of linear layers and grouped experts, written by the
layer straight into `main_grad` through `accumulate_in_place`, the model context's `grad_sink`: no gradient tensor,
no add), or "W" from a split backward's weight-gradient pass (`add_deferred`, called by the pipeline runtime). Each parameter receives one contribution per microbatch, of one kind, from the one model
chunk it belongs to; the runtime calls `last_contributions(chunk, kind)` when the chunk's backward of that kind for
the step's last microbatch begins, and from then on a contribution of that kind is final. Parameters held by two
chunks on this rank (the tied embedding of zb-v) are in buckets reduced in `finish()`. A contribution after a
parameter's final one raises instead of corrupting a reduction already started.

With `distributed` (the distributed optimizer, ZeRO-1), a bucket is reduce-scattered instead of all-reduced: each
rank of the data-parallel group receives the sum of its 1/g of the bucket, the part its optimizer updates
(`segments()`), and `gather_params()` all-gathers the updated weights afterwards.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

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
    early: bool
    """Whether the bucket may start during the backward pass (with `overlap`)."""
    owned: tuple[int, int]
    """The range of `buffer` this rank's optimizer updates: all of it, or its 1/g with the distributed optimizer."""
    pending: set[int] = field(default_factory=set)
    request: dist.Work | None = None
    scattered: torch.Tensor | None = None


Kind = Literal["B", "W"]


class GradReducer:
    """Owns the fp32 gradient buffers of `params` and reduces them over their data-parallel groups.

    `chunks` lists the parameters of each model chunk on this rank (default: one chunk holding all of them); the
    pipeline runtime names chunks by their index here. `start_times` holds the `time.perf_counter()` at which each
    bucket's reduction of the current step started.
    """

    def __init__(self, params: list[torch.nn.Parameter], groups: ProcessGroups, *, bucket_size: int = 40_000_000,
                 overlap: bool = False, distributed: bool = False, tied_params: list[torch.nn.Parameter] = (),
                 chunks: list[list[torch.nn.Parameter]] | None = None, fusable: list[torch.nn.Parameter] = ()):
        self.groups, self.overlap, self.distributed = groups, overlap, distributed
        self.params = [p for p in params if p.requires_grad]
        self._fusable = {id(p) for p in fusable if p.requires_grad}
        """Parameters whose weight gradient `accumulate_in_place` may write (each used by one product per pass)."""
        self.tied_params = list(tied_params)
        chunks = [self.params] if chunks is None else chunks
        holders: dict[int, int] = {}
        for members in chunks:
            for p in {id(p): p for p in members}.values():
                holders[id(p)] = holders.get(id(p), 0) + 1
        self._chunk_params = [[id(p) for p in members if p.requires_grad and holders[id(p)] == 1]
                              for members in chunks]
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._final: dict[Kind, set[int]] = {"B": set(), "W": set()}
        """Parameters whose next contribution of each kind is their last of the step."""
        self._done: set[int] = set()
        """Parameters whose last contribution of the step has arrived."""
        by_key: dict[tuple[str, bool, bool], list[torch.nn.Parameter]] = {}
        for p in reversed(self.params):  # roughly the order in which backward produces gradients
            extra = bool(self._extra_groups(p))
            early = not extra and holders.get(id(p)) == 1
            by_key.setdefault((get_spec(p).data_parallel_group, extra, early), []).append(p)
        for (kind, extra, early), members in by_key.items():
            chunk: list[torch.nn.Parameter] = []
            for p in members:
                chunk.append(p)
                if sum(q.numel() for q in chunk) >= bucket_size:
                    self._add_bucket(kind, extra, early, chunk)
                    chunk = []
            if chunk:
                self._add_bucket(kind, extra, early, chunk)
        self._name = {id(p): f"parameter {i} of shape {tuple(p.shape)}" for i, p in enumerate(self.params)}
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_autograd_grad)
        self.zero_grad()

    def _extra_groups(self, p: torch.nn.Parameter) -> list[dist.ProcessGroup]:
        """The groups besides data parallelism that `p`'s gradient is summed over."""
        out = [getattr(self.groups, kind) for kind in get_spec(p).replicated_over if self.groups.size(kind) > 1]
        if any(p is q for q in self.tied_params) and self.groups.embedding is not None \
                and self.groups.size("embedding") > 1:
            out.append(self.groups.embedding)
        return out

    def _add_bucket(self, kind: str, extra_sums: bool, early: bool, params: list[torch.nn.Parameter]) -> None:
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
        bucket = _Bucket(kind, buffer, params, offsets, extra_sums, early, owned)
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

    def _on_autograd_grad(self, p: torch.nn.Parameter) -> None:
        if p.grad is None:  # a linear layer deferred this gradient to the W pass (`add_deferred`)
            return
        grad, p.grad = p.grad, None
        self._contribute(p, grad, "B")

    @torch.no_grad()
    def add_deferred(self, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """A weight gradient computed by the W pass of a split backward."""
        self._contribute(p, grad, "W")

    def accumulate_in_place(self, p: torch.nn.Parameter, write: Callable[[torch.Tensor], None]) -> bool:
        """Gradient-accumulation fusion (a `ModelContext.grad_sink`): `write(p.main_grad)` adds an autograd-time
        weight gradient straight into the fp32 buffer (an accumulating matmul: no gradient tensor, no add), counted
        as `p`'s B contribution. False, and nothing written, for parameters outside `fusable` (used by more than
        one product: their autograd gradient is the sum of all uses, one contribution)."""
        if id(p) not in self._fusable:
            return False
        self._contribute(p, None, "B", write)
        return True

    def _contribute(self, p: torch.nn.Parameter, grad: torch.Tensor | None, kind: Kind,
                    write: Callable[[torch.Tensor], None] | None = None) -> None:
        key = id(p)
        if key in self._done:
            raise RuntimeError(f"{self._name[key]}: a {kind} gradient arrived after its last one of the step, when its "
                               "bucket's reduction may have started; the schedule and the reducer disagree")
        if write is not None:
            write(p.main_grad)
        else:
            p.main_grad.add_(grad)
        if key in self._final[kind]:
            self._done.add(key)
            bucket = self._bucket_of[key]
            if bucket.early:
                bucket.pending.discard(key)
                if not bucket.pending:
                    self._start(bucket)

    def last_contributions(self, chunk: int, kind: Kind) -> None:
        """The backward of `kind` ('B' autograd, 'W' deferred weight gradients) of the step's last microbatch is
        about to run on model chunk `chunk`: each parameter's next contribution of that kind is its last."""
        if self.overlap:
            self._final[kind].update(self._chunk_params[chunk])

    def _start(self, bucket: _Bucket) -> None:
        if bucket.request is not None or self.groups.size(bucket.group_kind) == 1:
            return
        self.start_times.append(time.perf_counter())
        group = getattr(self.groups, bucket.group_kind)
        if self.distributed:
            lo, hi = bucket.owned
            bucket.scattered = torch.empty(hi - lo, dtype=bucket.buffer.dtype, device=bucket.buffer.device)
            bucket.request = comm.reduce_scatter_tensor_async(bucket.scattered, bucket.buffer, group)
        else:
            bucket.request = comm.all_reduce_async(bucket.buffer, group)

    def _begin_step(self) -> None:
        """No contribution is final yet: every early bucket waits for all of its parameters."""
        for bucket in self.buckets:
            bucket.pending = {id(p) for p in bucket.params} if bucket.early else set()
        self._final = {"B": set(), "W": set()}
        self._done = set()

    def zero_grad(self) -> None:
        """Zero the buffers and begin a new step."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.request = None
        for p in self.params:
            p.grad = None
        self.start_times: list[float] = []
        self._begin_step()

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
        self._begin_step()

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
