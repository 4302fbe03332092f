"""How a parameter is cut from its full tensor, and layout-independent initialisation.

Every parameter carries a `ShardSpec`. Initialisation draws the FULL tensor from a generator seeded by the run seed
and the parameter's global name, then keeps this rank's shard, so any layout gives the same model as one process.
The same spec gathers shards back into the full tensor (tests, checkpoints).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from megalite import comm

InitKind = Literal["normal", "ones", "zeros"]


@dataclass(frozen=True)
class ShardSpec:
    """`full_shape` is cut along `dim` over `size` ranks; this rank holds piece `rank`.

    With `stride` > 1 the full tensor is `stride` blocks along `dim` (e.g. SwiGLU's [gate; up]) and each block is
    cut separately; the shard is this rank's piece of every block, concatenated.
    `replicated_over` names groups (e.g. "tp" for norm weights under sequence parallelism) whose ranks hold
    identical copies that see different data, so their gradients must be summed over that group.
    """

    full_shape: tuple[int, ...]
    dim: int | None = None
    rank: int = 0
    size: int = 1
    stride: int = 1
    group: str = "tp"
    """Kind of process group (see ProcessGroups) the tensor is cut over."""
    init: InitKind = "normal"
    std: float = 0.02
    replicated_over: tuple[str, ...] = ()
    data_parallel_group: str = "dp_cp"
    """Group whose ranks hold copies trained on different data: gradients are summed over it ("edp" for experts)."""
    logical_shape: tuple[int, ...] | None = None
    """How checkpoints and converters see the full tensor: a view of `full_shape` that splits the sharded dimension
    into several (e.g. the fused QKV rows as [query groups, heads per group + 2, head size]), the shard being a
    slice of the first of them. Default: `full_shape`; with `stride` > 1 the blocks become a leading dimension."""

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] //= self.size
        return tuple(shape)

    def logical(self) -> tuple[tuple[int, ...], int | None]:
        """(the logical shape, the logical dimension this rank's shard is a slice of; None if not sharded), so that
        every rank's shard is a box of the logical tensor (see `logical_shape`)."""
        full, d = self.full_shape, self.dim
        if d is not None and self.stride > 1:
            return (*full[:d], self.stride, full[d] // self.stride, *full[d + 1:]), d + 1
        shape = self.logical_shape or full
        if d is None:
            return shape, None
        outer = math.prod(full[:d])
        for i in range(len(shape)):
            if math.prod(shape[:i]) == outer:
                return shape, i
        raise ValueError(f"logical shape {shape} does not split the dimensions of {full}")

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the full tensor."""
        if self.dim is None or self.size == 1:
            return full
        blocks = full.chunk(self.stride, dim=self.dim)
        return torch.cat([b.chunk(self.size, dim=self.dim)[self.rank] for b in blocks], dim=self.dim)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's shard (in rank order)."""
        if self.dim is None or self.size == 1:
            return shards[0]
        per_rank = [s.chunk(self.stride, dim=self.dim) for s in shards]
        blocks = [torch.cat([p[i] for p in per_rank], dim=self.dim) for i in range(self.stride)]
        return torch.cat(blocks, dim=self.dim)


def set_spec(param: torch.nn.Parameter, spec: ShardSpec) -> torch.nn.Parameter:
    if tuple(param.shape) != spec.local_shape:
        raise ValueError(f"parameter shape {tuple(param.shape)} does not match its spec {spec.local_shape}")
    param.shard_spec = spec
    return param


def get_spec(param: torch.Tensor) -> ShardSpec:
    spec = getattr(param, "shard_spec", None)
    if spec is None:
        return ShardSpec(full_shape=tuple(param.shape))
    return spec


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def full_init(spec: ShardSpec, seed: int, name: str) -> torch.Tensor:
    """The full fp32 tensor of a parameter, drawn from (seed, global name) alone."""
    if spec.init == "ones":
        return torch.ones(spec.full_shape)
    if spec.init == "zeros":
        return torch.zeros(spec.full_shape)
    return torch.empty(spec.full_shape).normal_(0.0, spec.std, generator=_generator(seed, name))


@torch.no_grad()
def initialize_parameters(named_params: list[tuple[str, torch.nn.Parameter]], seed: int) -> None:
    """Fill each parameter with its shard of the full tensor drawn from (seed, global name)."""
    for name, p in named_params:
        spec = get_spec(p)
        p.copy_(spec.shard(full_init(spec, seed, name)).to(p.dtype))


def gather_full(tensor: torch.Tensor, spec: ShardSpec, group: dist.ProcessGroup) -> torch.Tensor:
    """Reassemble the full tensor from the shards held by the ranks of `group` (the group `spec` was cut over)."""
    if spec.dim is None or spec.size == 1:
        return tensor
    out = tensor.new_empty((spec.size, *tensor.shape))
    comm.all_gather_into_tensor(out, tensor.contiguous().unsqueeze(0), group)
    return spec.unshard(list(out.unbind(0)))
