"""Every collective megalite issues goes through here, and a failure names the group it ran on.

`count_comm()` counts what reaches torch's collective operators inside its block: for each call, the collective
kind, the group's name and the bytes this rank contributes (input payload; for point-to-point, bytes sent and
received separately). It is a torch dispatch mode the caller holds for the block (torch keeps it on its mode stack,
the backward included), so nothing is registered in this module and two callers cannot see each other's counts.
Tests compare the counts with formulas.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# torch's c10d operator -> (kind as counted, index of the argument whose bytes count)
_COUNTED_OPS = {
    "allreduce_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "alltoall_base_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0),
    "send": ("send", 0),
    "recv_": ("recv", 0),
}


def group_name(group: dist.ProcessGroup | None) -> str:
    """The group's description given at creation (e.g. 'tp[0, 1]'), or 'world'."""
    if group is None or group.group_name == dist.group.WORLD.group_name:
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


def _nbytes(arg: object) -> int:
    tensors = arg if isinstance(arg, (list, tuple)) else [arg]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _process_group(args: tuple) -> dist.ProcessGroup | None:
    """The process group among an operator's arguments (torch passes it boxed as a script object)."""
    for a in args:
        if isinstance(a, torch.ScriptObject) and a._type().qualified_name().endswith(".ProcessGroup"):
            return dist.ProcessGroup.unbox(a)
    return None


class _CountingMode(TorchDispatchMode):
    """Adds every c10d collective dispatched inside the mode to `counter`."""

    def __init__(self, counter: CommCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        counted = _COUNTED_OPS.get(func._opname) if func.namespace == "c10d" else None
        if counted is not None:
            kind, index = counted
            self.counter.add(kind, _process_group(args), _nbytes(args[index]))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count the bytes of every collective issued inside the block (see the module docstring)."""
    counter = CommCounter()
    with _CountingMode(counter):
        yield counter


@contextlib.contextmanager
def _naming(kind: str, group: dist.ProcessGroup | None) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        raise RuntimeError(f"{kind} on process group {group_name(group)} failed: {e}") from e


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group` (nothing to do over a group of one)."""
    if dist.get_world_size(group) == 1:
        return tensor
    with _naming("all_reduce", group):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_async(tensor: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """Start an in-place sum of `tensor` over `group`; wait on the returned request."""
    with _naming("all_reduce", group):
        return dist.all_reduce(tensor, group=group, async_op=True)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Gather `tensor` from every rank of `group` into `output`, concatenated along dimension 0."""
    with _naming("all_gather", group):
        _all_gather_single(output, tensor.contiguous(), group=group)
    return output


def reduce_scatter_tensor(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum `tensor` over `group` and keep this rank's slice of dimension 0 in `output`."""
    with _naming("reduce_scatter", group):
        _reduce_scatter_single(output, tensor.contiguous(), group=group)
    return output


def reduce_scatter_tensor_async(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """Start `reduce_scatter_tensor`; wait on the returned request. `tensor` must be contiguous."""
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
    with _naming("all_to_all", group):
        dist.all_to_all_single(
            output, tensor.contiguous(), output_split_sizes, input_split_sizes, group=group
        )
    return output


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Broadcast `tensor` from global rank `src` over `group`, in place."""
    with _naming("broadcast", group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def batch_isend_irecv(
    sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group: dist.ProcessGroup
) -> list[dist.Work]:
    """Start point-to-point sends and receives together; peers are global ranks. Returns the requests to wait on."""
    ops = [dist.P2POp(dist.isend, t, peer, group=group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group=group) for t, peer in recvs]
    if not ops:
        return []
    with _naming("batch_isend_irecv", group):
        return dist.batch_isend_irecv(ops)


def barrier(group: dist.ProcessGroup | None = None, what: str = "barrier") -> None:
    """Wait until every rank of `group` (default: the world) arrives; a timeout names the group and `what`."""
    with _naming(what, group):
        dist.barrier(group=group)


def wait_all(requests: list[dist.Work], group: dist.ProcessGroup) -> None:
    """Wait for point-to-point requests; a failure names the group."""
    with _naming("p2p wait", group):
        for r in requests:
            r.wait()
