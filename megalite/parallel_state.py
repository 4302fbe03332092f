"""The rank grid (a pure function) and the process groups built from it.

Dense layers use the grid TP x CP x DP x PP, MoE layers the grid ETP x EP x EDP x PP over the same ranks. The order
string has Megatron-Core's meaning: the leftmost dimension varies fastest, `ep` is skipped in the dense grid and `cp`
in the expert grid, so a job moved from Megatron-LM lands on the same ranks.

`initialize_model_parallel` returns this rank's groups as a `ProcessGroups` record; whoever builds a model passes
the record (or single groups from it) down. Nothing here remembers a layout: several layouts may exist in one
process at once (a policy and a reference model), each destroyed with `destroy_model_parallel(groups)`.
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

    Layers are given the groups they use (e.g. `groups.tp`); nothing looks them up globally.
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
    created: list[dist.ProcessGroup] = field(default_factory=list, repr=False)
    """The groups made for this record, destroyed by `destroy_model_parallel`."""

    def size(self, kind: str) -> int:
        return len(self.ranks[kind])

    def rank(self, kind: str) -> int:
        return self.ranks[kind].index(dist.get_rank())


class GroupCache:
    """Process groups kept across `destroy_model_parallel` and handed out again to a later
    `initialize_model_parallel` with the same (kind, members, timeout); the kind is in the key so that a group keeps
    the name it is reported under (`comm.group_name`).

    For processes that build many layouts one after another (the test harness's pooled ranks): every gloo group
    costs a store round trip and a full-mesh TCP connect, and creating thousands of them is slow and exposes the
    suite to rare connect failures. Set-up only: nothing on the training path reads it. Like torch's own registry of
    groups it belongs to the process (`GROUP_CACHE`); it must be enabled identically on all ranks."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, tuple[int, ...], datetime.timedelta], dist.ProcessGroup | None] | None = None

    @property
    def enabled(self) -> bool:
        return self.groups is not None

    def enable(self) -> None:
        if self.groups is None:
            self.groups = {}


GROUP_CACHE = GroupCache()


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
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call megalite.distributed.init_distributed() first")
    world, me = dist.get_world_size(), dist.get_rank()
    layout = generate_rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    by_members: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    created: list[dist.ProcessGroup] = []
    mine: dict[str, dist.ProcessGroup | None] = {}
    ranks: dict[str, list[int]] = {}
    for kind in GROUP_KINDS:
        for members in layout[kind]:
            key = tuple(members)
            if key not in by_members:
                by_members[key] = _new_group(kind, key, timeout, me in members, created)
            if me in members:
                mine[kind] = by_members[key]
                ranks[kind] = list(members)
    return ProcessGroups(
        **{k: mine[k] for k in GROUP_KINDS if k not in ("embedding", "expert_pp")},
        embedding=mine.get("embedding"),
        ranks=ranks,
        created=created,
    )


def _new_group(kind: str, members: tuple[int, ...], timeout: datetime.timedelta, member: bool,
               created: list[dist.ProcessGroup]) -> dist.ProcessGroup | None:
    """A group of `members` (collective over all ranks: every rank calls this for every group, in the same order);
    None on ranks outside it. Taken from the group cache when it is enabled; else appended to `created`."""
    cache = GROUP_CACHE.groups
    if cache is not None and (kind, members, timeout) in cache:
        return cache[kind, members, timeout]
    pg = dist.new_group(list(members), timeout=timeout, group_desc=f"{kind}{list(members)}")
    mine = pg if member else None
    if cache is not None:
        cache[kind, members, timeout] = mine
    elif member:
        created.append(pg)
    return mine


def destroy_model_parallel(groups: ProcessGroups) -> None:
    """Destroy the groups `initialize_model_parallel` made for `groups` (none when the group cache kept them)."""
    for pg in groups.created:
        dist.destroy_process_group(pg)
    groups.created.clear()
