"""The rank grid (a pure function), the process groups built from it, and top-level getters.

Dense layers use the grid TP x CP x DP x PP, MoE layers the grid ETP x EP x EDP x PP over the same ranks. The order
string has Megatron-Core's meaning: the leftmost dimension varies fastest, `ep` is skipped in the dense grid and `cp`
in the expert grid, so a job moved from Megatron-LM lands on the same ranks.

Layers never call the getters: they are given the groups they use (`ProcessGroups`). The getters exist for the
top level (training loop, logging).
"""
from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ORDER_DIMS = ("tp", "cp", "ep", "dp", "pp")

# Group kinds: name -> (grid, dimensions that vary inside one group).
DENSE_GROUPS = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_cp": ("dp", "cp"),
    "tp_cp": ("tp", "cp"),
    "tp_pp": ("tp", "pp"),
    "tp_dp_cp": ("tp", "dp", "cp"),
}
EXPERT_GROUPS = {
    "ep": ("ep",),
    "etp": ("tp",),
    "edp": ("dp",),
    "tp_ep": ("tp", "ep"),
    "expert_pp": ("pp",),
}
GROUP_KINDS = (*DENSE_GROUPS, *EXPERT_GROUPS, "embedding")


def parse_order(order: str) -> list[str]:
    """Split an order string such as 'tp-cp-ep-dp-pp'; every dimension exactly once."""
    dims = order.lower().split("-")
    if sorted(dims) != sorted(ORDER_DIMS):
        raise ValueError(
            f"must name each of {', '.join(ORDER_DIMS)} exactly once, joined by '-' (e.g. 'tp-cp-ep-dp-pp')"
        )
    return dims


def _leftmost_fastest(sizes: list[int]) -> list[tuple[int, ...]]:
    """All index tuples of a grid with the given sizes, the first index varying fastest."""
    return [tuple(reversed(ix)) for ix in itertools.product(*(range(s) for s in reversed(sizes)))]


def _grid_groups(sizes: dict[str, int], order: list[str], varying: tuple[str, ...]) -> list[list[int]]:
    """Groups of ranks in which the `varying` dimensions change and all others are fixed."""
    strides, stride = {}, 1
    for d in order:
        strides[d] = stride
        stride *= sizes[d]
    fixed = [d for d in order if d not in varying]
    moving = [d for d in order if d in varying]
    offsets = [
        sum(i * strides[d] for i, d in zip(ix, moving)) for ix in _leftmost_fastest([sizes[d] for d in moving])
    ]
    groups = []
    for ix in _leftmost_fastest([sizes[d] for d in fixed]):
        base = sum(i * strides[d] for i, d in zip(ix, fixed))
        groups.append([base + o for o in offsets])
    return groups


def generate_rank_groups(
    world_size: int,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    order: str = "tp-cp-ep-dp-pp",
) -> dict[str, list[list[int]]]:
    """Every group of every kind, as lists of global ranks (see `GROUP_KINDS`).

    The dense grid is TP x CP x DP x PP and the expert grid ETP x EP x EDP x PP; `etp` defaults to `tp`.
    `embedding` holds the first and last rank of each pipeline group.
    """
    etp = tp if etp is None else etp
    dims = parse_order(order)
    for name, size in [("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep), ("etp", etp)]:
        if size < 1:
            raise ValueError(f"{name} size {size} must be at least 1")
    if world_size % (tp * cp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tp*cp*pp = {tp * cp * pp}")
    if world_size % (etp * ep * pp):
        raise ValueError(f"world size {world_size} is not divisible by etp*ep*pp = {etp * ep * pp}")
    dense = {"tp": tp, "cp": cp, "ep": 1, "dp": world_size // (tp * cp * pp), "pp": pp}
    expert = {"tp": etp, "cp": 1, "ep": ep, "dp": world_size // (etp * ep * pp), "pp": pp}

    groups = {name: _grid_groups(dense, dims, varying) for name, varying in DENSE_GROUPS.items()}
    groups |= {name: _grid_groups(expert, dims, varying) for name, varying in EXPERT_GROUPS.items()}
    if sorted(map(sorted, groups["pp"])) != sorted(map(sorted, groups["expert_pp"])):
        raise ValueError(
            f"order {order!r} gives different pipeline groups in the dense and expert grids; "
            "put 'pp' where both grids agree (e.g. last, as in 'tp-cp-ep-dp-pp')"
        )
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
    return groups


@dataclass
class ProcessGroups:
    """This rank's process group of each kind, and that group's global ranks.

    Layers are given the groups they use (e.g. `groups.tp`); nothing below the top level looks them up globally.
    """

    tp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup
    tp_cp: dist.ProcessGroup
    tp_pp: dist.ProcessGroup
    tp_dp_cp: dist.ProcessGroup
    ep: dist.ProcessGroup
    etp: dist.ProcessGroup
    edp: dist.ProcessGroup
    tp_ep: dist.ProcessGroup
    embedding: dist.ProcessGroup | None
    """First and last pipeline stage (tied embeddings); None on the ranks in between."""
    ranks: dict[str, list[int]] = field(default_factory=dict)
    """Global ranks of each of this rank's groups, by kind."""

    def size(self, kind: str) -> int:
        return len(self.ranks[kind])

    def rank(self, kind: str) -> int:
        return self.ranks[kind].index(dist.get_rank())


_GROUPS: ProcessGroups | None = None
_CREATED: list[dist.ProcessGroup] = []
_REUSABLE: dict[tuple[str, tuple[int, ...], datetime.timedelta], dist.ProcessGroup | None] | None = None
"""Groups kept across `destroy_model_parallel` when group reuse is on, by (kind, members, timeout): the kind is in
the key so that a group keeps the name it is reported under (`comm.group_name`). None when reuse is off."""


def set_group_reuse(enabled: bool) -> None:
    """Keep process groups alive across `destroy_model_parallel` and hand them out again to a later
    `initialize_model_parallel` with the same members.

    For processes that build many layouts one after another (the test harness's pooled ranks): every gloo group
    costs a store round trip and a full-mesh TCP connect, and creating thousands of them is slow and exposes the
    suite to rare connect failures. Must be set identically on all ranks, before any group is made."""
    global _REUSABLE
    if _GROUPS is not None:
        raise RuntimeError("set_group_reuse() must be called while no model-parallel groups exist")
    if not enabled and _REUSABLE:
        for pg in _REUSABLE.values():
            if pg is not None:
                dist.destroy_process_group(pg)
    _REUSABLE = {} if enabled else None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_model_parallel(
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    order: str = "tp-cp-ep-dp-pp",
    timeout_minutes: float = 10.0,
) -> ProcessGroups:
    """Create every group of the layout on the initialised default group; return this rank's `ProcessGroups`.

    Must be called by all ranks with the same arguments. Groups with identical members are created once.
    """
    global _GROUPS
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call megalite.distributed.init_distributed() first")
    if _GROUPS is not None:
        raise RuntimeError("model parallel groups already exist: call destroy_model_parallel() first")
    world, me = dist.get_world_size(), dist.get_rank()
    layout = generate_rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    by_members: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    mine: dict[str, dist.ProcessGroup | None] = {}
    ranks: dict[str, list[int]] = {}
    for kind in GROUP_KINDS:
        for members in layout[kind]:
            key = tuple(members)
            if key not in by_members:
                by_members[key] = _new_group(kind, key, timeout, member=me in members)
            if me in members:
                mine[kind] = by_members[key]
                ranks[kind] = list(members)
    _GROUPS = ProcessGroups(
        **{k: mine[k] for k in GROUP_KINDS if k not in ("embedding", "expert_pp")},
        embedding=mine.get("embedding"),
        ranks=ranks,
    )
    return _GROUPS


def _new_group(
    kind: str, members: tuple[int, ...], timeout: datetime.timedelta, member: bool
) -> dist.ProcessGroup | None:
    """A group of `members` (collective over all ranks: every rank calls this for every group, in the same order);
    None on ranks outside it. Reuses a kept group when group reuse is on."""
    if _REUSABLE is not None and (kind, members, timeout) in _REUSABLE:
        return _REUSABLE[kind, members, timeout]
    pg = dist.new_group(list(members), timeout=timeout, group_desc=f"{kind}{list(members)}")
    mine = pg if member else None
    if _REUSABLE is not None:
        _REUSABLE[kind, members, timeout] = mine
    elif member:
        _CREATED.append(pg)
    return mine


def destroy_model_parallel() -> None:
    """Destroy the groups made by `initialize_model_parallel` (the default group stays; with group reuse on, the
    groups are kept for the next layout)."""
    global _GROUPS
    for pg in _CREATED:
        dist.destroy_process_group(pg)
    _CREATED.clear()
    _GROUPS = None


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def get_process_groups() -> ProcessGroups:
    """This rank's groups (top-level convenience; layers are given their groups)."""
    if _GROUPS is None:
        raise RuntimeError("model parallel groups are not initialised: call initialize_model_parallel()")
    return _GROUPS


def get_group(kind: str) -> dist.ProcessGroup:
    return getattr(get_process_groups(), kind)


def get_size(kind: str) -> int:
    return get_process_groups().size(kind)


def get_rank(kind: str) -> int:
    return get_process_groups().rank(kind)


def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    return get_group("tp")


def get_tensor_model_parallel_world_size() -> int:
    return get_size("tp")


def get_tensor_model_parallel_rank() -> int:
    return get_rank("tp")


def get_context_parallel_group() -> dist.ProcessGroup:
    return get_group("cp")


def get_context_parallel_world_size() -> int:
    return get_size("cp")


def get_context_parallel_rank() -> int:
    return get_rank("cp")


def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    return get_group("pp")


def get_pipeline_model_parallel_world_size() -> int:
    return get_size("pp")


def get_pipeline_model_parallel_rank() -> int:
    return get_rank("pp")


def get_data_parallel_group(with_context_parallel: bool = False) -> dist.ProcessGroup:
    return get_group("dp_cp" if with_context_parallel else "dp")


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return get_size("dp_cp" if with_context_parallel else "dp")


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return get_rank("dp_cp" if with_context_parallel else "dp")


def get_expert_model_parallel_group() -> dist.ProcessGroup:
    return get_group("ep")


def get_expert_model_parallel_world_size() -> int:
    return get_size("ep")


def get_expert_model_parallel_rank() -> int:
    return get_rank("ep")


def get_expert_tensor_parallel_group() -> dist.ProcessGroup:
    return get_group("etp")


def get_expert_tensor_parallel_world_size() -> int:
    return get_size("etp")


def get_expert_tensor_parallel_rank() -> int:
    return get_rank("etp")


def get_expert_data_parallel_group() -> dist.ProcessGroup:
    return get_group("edp")


def get_expert_data_parallel_world_size() -> int:
    return get_size("edp")


def get_expert_data_parallel_rank() -> int:
    return get_rank("edp")

