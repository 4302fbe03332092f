"""Every collective megalite issues goes through here: byte counting per kind and group, and errors that name the group.

`count_comm()` is a context manager that records, for each call made inside it, the collective kind, the group's
name and the bytes this rank contributes (input payload; for point-to-point, bytes sent and received separately).
Tests compare the counts with formulas; the training log prints them.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist


# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_name(group: dist.ProcessGroup | None) -> str:
    """The group's description given at creation (e.g. 'tp[0, 1]'), or 'world'."""
    if group is None or group is dist.GroupMember.WORLD:
        return "world"
    return getattr(group, "group_desc", None) or f"group{group.group_name}"


@dataclass
class CommCounter:
    """Calls and bytes per (collective kind, group name)."""

    bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, group: dist.ProcessGroup | None, nbytes: int) -> None:
        key = (kind, group_name(group))
        self.bytes[key] += nbytes
        self.calls[key] += 1

    def total(self, kind: str | None = None, group_prefix: str = "") -> int:
        """Bytes of one kind (or all kinds) over groups whose name starts with `group_prefix`."""
        return sum(
            b for (k, g), b in self.bytes.items() if (kind is None or k == kind) and g.startswith(group_prefix)
        )

    def table(self) -> str:
        rows = sorted(self.bytes)
        lines = [f"{'collective':<22}{'group':<28}{'calls':>8}{'bytes':>16}"]
        lines += [f"{k:<22}{g:<28}{self.calls[(k, g)]:>8}{self.bytes[(k, g)]:>16}" for k, g in rows]
        return "\n".join(lines)


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count the bytes of every collective issued inside the block."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(kind: str, group: dist.ProcessGroup | None, tensor: torch.Tensor) -> None:
    for counter in _COUNTERS:
        counter.add(kind, group, tensor.numel() * tensor.element_size())


@contextlib.contextmanager
def _naming(kind: str, group: dist.ProcessGroup | None) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        raise RuntimeError(f"{kind} on process group {group_name(group)} failed: {e}") from e


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group`."""
    _record("all_reduce", group, tensor)
    with _naming("all_reduce", group):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_async(tensor: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """Start an in-place sum of `tensor` over `group`; wait on the returned request."""
    _record("all_reduce", group, tensor)
    with _naming("all_reduce", group):
        return dist.all_reduce(tensor, group=group, async_op=True)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Gather `tensor` from every rank of `group` into `output`, concatenated along dimension 0."""
    _record("all_gather", group, tensor)
    with _naming("all_gather", group):
        _all_gather_single(output, tensor.contiguous(), group=group)
    return output


def reduce_scatter_tensor(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum `tensor` over `group` and keep this rank's slice of dimension 0 in `output`."""
    _record("reduce_scatter", group, tensor)
    with _naming("reduce_scatter", group):
        _reduce_scatter_single(output, tensor.contiguous(), group=group)
    return output


def reduce_scatter_tensor_async(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """Start `reduce_scatter_tensor`; wait on the returned request. `tensor` must be contiguous."""
    _record("reduce_scatter", group, tensor)
    with _naming("reduce_scatter", group):
        return _reduce_scatter_single(output, tensor, group=group, async_op=True)


def all_to_all_single(
    output: torch.Tensor,
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
) -> torch.Tensor:
    """All-to-all along dimension 0 with optional uneven splits."""
    _record("all_to_all", group, tensor)
    with _naming("all_to_all", group):
        dist.all_to_all_single(
            output, tensor.contiguous(), output_split_sizes, input_split_sizes, group=group
        )
    return output


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Broadcast `tensor` from global rank `src` over `group`, in place."""
    _record("broadcast", group, tensor)
    with _naming("broadcast", group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def batch_isend_irecv(
    sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group: dist.ProcessGroup
) -> list[dist.Work]:
    """Start point-to-point sends and receives together; peers are global ranks. Returns the requests to wait on."""
    ops = [dist.P2POp(dist.isend, t, peer, group=group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group=group) for t, peer in recvs]
    for t, _ in sends:
        _record("send", group, t)
    for t, _ in recvs:
        _record("recv", group, t)
    if not ops:
        return []
    with _naming("batch_isend_irecv", group):
        return dist.batch_isend_irecv(ops)


def wait_all(requests: list[dist.Work], group: dist.ProcessGroup) -> None:
    """Wait for point-to-point requests; a failure names the group."""
    with _naming("p2p wait", group):
        for r in requests:
            r.wait()
