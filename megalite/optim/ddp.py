"""Gradient reduction over data parallelism, in buckets, overlapped with the backward pass.

Every parameter gets `main_grad`, an fp32 view into a flat bucket buffer, and gradients are accumulated there
across microbatches. Dense parameters are summed over the DP x CP group, expert parameters over the expert
data-parallel group (their `ShardSpec.data_parallel_group`). With `overlap`, a bucket's all-reduce starts as soon
as every gradient in it is final (during the last microbatch's backward); `finish()` waits for them, then sums
parameters replicated over groups that saw different data (e.g. norm weights under sequence parallelism, over TP)
and the tied embedding copies over the embedding group (first and last pipeline stage).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megalite import comm
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel.sharding import get_spec


@dataclass
class _Bucket:
    group_kind: str
    buffer: torch.Tensor
    params: list[torch.nn.Parameter]
    pending: set[int] = field(default_factory=set)
    request: dist.Work | None = None


class GradReducer:
    """Owns the fp32 gradient buffers of `params` and reduces them over their data-parallel groups."""

    def __init__(self, params: list[torch.nn.Parameter], groups: ProcessGroups, *, bucket_size: int = 40_000_000,
                 overlap: bool = False, tied_params: list[torch.nn.Parameter] = ()):
        self.groups, self.overlap = groups, overlap
        self.params = [p for p in params if p.requires_grad]
        self.tied_params = list(tied_params)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._final_pass = False
        by_group: dict[str, list[torch.nn.Parameter]] = {}
        for p in reversed(self.params):  # roughly the order in which backward produces gradients
            by_group.setdefault(get_spec(p).data_parallel_group, []).append(p)
        for kind, members in by_group.items():
            chunk: list[torch.nn.Parameter] = []
            for p in members:
                chunk.append(p)
                if sum(q.numel() for q in chunk) >= bucket_size:
                    self._add_bucket(kind, chunk)
                    chunk = []
            if chunk:
                self._add_bucket(kind, chunk)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)
            p.on_deferred_grad = self._on_grad

    def _add_bucket(self, kind: str, params: list[torch.nn.Parameter]) -> None:
        device = params[0].device
        buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            p.main_grad = buffer[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        bucket = _Bucket(kind, buffer, params)
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if p.grad is None:  # a linear layer deferred this gradient to the W pass, which calls back later
            return
        p.main_grad.add_(p.grad)
        p.grad = None
        if self._final_pass:
            bucket = self._bucket_of[id(p)]
            bucket.pending.discard(id(p))
            if not bucket.pending:
                self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        if bucket.request is None and self.groups.size(bucket.group_kind) > 1:
            bucket.request = comm.all_reduce_async(bucket.buffer, getattr(self.groups, bucket.group_kind))

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
        """Complete every reduction; afterwards each `main_grad` is the gradient of the whole global batch."""
        for bucket in self.buckets:
            self._start(bucket)
        for bucket in self.buckets:
            if bucket.request is not None:
                bucket.request.wait()
                bucket.request = None
        self._final_pass = False
        for p in self.params:
            for kind in get_spec(p).replicated_over:
                if self.groups.size(kind) > 1:
                    comm.all_reduce(p.main_grad, getattr(self.groups, kind))
        if self.tied_params and self.groups.embedding is not None and self.groups.size("embedding") > 1:
            for p in self.tied_params:
                comm.all_reduce(p.main_grad, self.groups.embedding)
