"""Rank layouts as pure functions (up to 4096 ranks) and the real groups on 8 gloo ranks."""
import itertools

import pytest
import torch
import torch.distributed as dist

from megalite import comm
from megalite import parallel_state as ps
from megalite.parallel_state import generate_rank_groups
from megalite.testing import run_distributed

LAYOUTS = [
    # world, tp, cp, pp, ep, etp, order
    (1, 1, 1, 1, 1, None, "tp-cp-ep-dp-pp"),
    (8, 2, 4, 1, 4, 2, "tp-cp-ep-dp-pp"),
    (8, 2, 1, 2, 2, 1, "tp-cp-ep-dp-pp"),
    (16, 2, 2, 2, 4, 1, "tp-cp-ep-dp-pp"),
    (64, 4, 2, 4, 8, 2, "tp-cp-ep-dp-pp"),
    (64, 2, 2, 2, 4, 2, "tp-dp-cp-ep-pp"),
    (96, 2, 3, 2, 4, 1, "cp-tp-ep-dp-pp"),
    (4096, 8, 4, 8, 64, 1, "tp-cp-ep-dp-pp"),
    (4096, 4, 2, 16, 16, 2, "tp-cp-ep-dp-pp"),
]


def _by_rank(groups: list[list[int]]) -> dict[int, list[int]]:
    return {r: g for g in groups for r in g}


@pytest.mark.parametrize("world,tp,cp,pp,ep,etp,order", LAYOUTS)
def test_every_kind_of_group_partitions_the_ranks(world, tp, cp, pp, ep, etp, order):
    layout = generate_rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    etp = etp or tp
    dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
    sizes = {"tp": tp, "cp": cp, "pp": pp, "dp": dp, "dp_cp": dp * cp, "tp_cp": tp * cp, "tp_pp": tp * pp,
             "tp_dp_cp": tp * dp * cp, "ep": ep, "etp": etp, "edp": edp, "tp_ep": etp * ep}
    for kind, size in sizes.items():
        groups = layout[kind]
        assert sorted(r for g in groups for r in g) == list(range(world)), kind
        assert all(len(g) == size for g in groups), kind
        assert all(g == sorted(g) for g in groups), kind


@pytest.mark.parametrize("world,tp,cp,pp,ep,etp,order", LAYOUTS)
def test_orthogonal_groups_meet_in_exactly_one_rank(world, tp, cp, pp, ep, etp, order):
    layout = generate_rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    maps = {kind: _by_rank(groups) for kind, groups in layout.items() if kind != "embedding"}
    for a, b in itertools.combinations(["tp", "cp", "dp", "pp"], 2):
        for r in range(world):
            assert set(maps[a][r]) & set(maps[b][r]) == {r}, (a, b, r)
    for a, b in itertools.combinations(["etp", "ep", "edp", "pp"], 2):
        for r in range(world):
            assert set(maps[a][r]) & set(maps[b][r]) == {r}, (a, b, r)
    for r in range(world):
        assert set(maps["dp_cp"][r]) == {x for d in maps["dp"][r] for x in maps["cp"][d]}
        assert set(maps["tp_ep"][r]) == {x for e in maps["ep"][r] for x in maps["etp"][e]}


@pytest.mark.parametrize("world,tp,cp,pp,ep,etp,order", LAYOUTS)
def test_dense_and_expert_grids_share_pipeline_groups(world, tp, cp, pp, ep, etp, order):
    layout = generate_rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    assert layout["pp"] == layout["expert_pp"]
    assert layout["embedding"] == [sorted({g[0], g[-1]}) for g in layout["pp"]]


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-dp-cp-ep-pp", "cp-tp-ep-dp-pp", "dp-tp-cp-ep-pp"])
def test_rank_strides_follow_the_order(order):
    world, sizes = 48, {"tp": 2, "cp": 3, "pp": 2, "ep": 1}
    sizes["dp"] = world // (sizes["tp"] * sizes["cp"] * sizes["pp"])
    layout = generate_rank_groups(world, tp=2, cp=3, pp=2, order=order)
    stride = 1
    for dim in order.split("-"):
        if dim == "ep":
            continue
        group_of_zero = next(g for g in layout[dim] if 0 in g)
        assert group_of_zero == [i * stride for i in range(sizes[dim])], dim
        stride *= sizes[dim]


def test_matches_megatron_default_layout_for_tp2_cp4_ep4():
    # Megatron-Core's RankGenerator with order tp-cp-ep-dp-pp, world 8, tp=2 cp=4 ep=4 etp=2.
    layout = generate_rank_groups(8, tp=2, cp=4, ep=4, etp=2)
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout["dp"] == [[i] for i in range(8)]
    assert layout["ep"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout["etp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["edp"] == [[i] for i in range(8)]
    assert layout["tp_ep"] == [list(range(8))]
    assert layout["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_bad_order_and_sizes_are_rejected():
    with pytest.raises(ValueError, match="exactly once"):
        generate_rank_groups(8, order="tp-cp-dp-pp")
    with pytest.raises(ValueError, match="not divisible"):
        generate_rank_groups(8, tp=3)
    with pytest.raises(ValueError, match="different pipeline groups"):
        generate_rank_groups(8, tp=2, pp=2, etp=1, order="tp-pp-cp-ep-dp")


def _reachable_ranks_of_every_group():
    """Each rank all-gathers its global rank over each of its groups: which ranks does each group reach?"""
    groups = ps.initialize_model_parallel(tp=2, cp=4, ep=4, etp=2)
    reached = {}
    for kind in ("tp", "cp", "dp", "pp", "dp_cp", "tp_cp", "ep", "etp", "edp", "tp_ep", "embedding"):
        pg = getattr(groups, kind)
        size = dist.get_world_size(pg)
        out = torch.zeros(size, dtype=torch.long)
        comm.all_gather_into_tensor(out, torch.tensor([dist.get_rank()]), pg)
        reached[kind] = out.tolist()
    assert groups.size("tp") == 2 and groups.size("ep") == 4
    ps.destroy_model_parallel(groups)
    return reached


def test_eight_gloo_ranks_reach_the_layout_groups_tp2_cp4_ep4_etp2():
    results = run_distributed(8, _reachable_ranks_of_every_group)
    layout = generate_rank_groups(8, tp=2, cp=4, ep=4, etp=2)
    for rank, reached in enumerate(results):
        for kind, ranks in reached.items():
            assert ranks == _by_rank(layout[kind])[rank], (rank, kind)


def _groups_across_two_layouts():
    """Build TP=2, then TP=1, then TP=2 again on pooled ranks (group reuse on): report which group objects came
    back and that each still reaches the right ranks."""
    seen = []
    for tp in (2, 1, 2):
        groups = ps.initialize_model_parallel(tp=tp)
        out = torch.zeros(groups.size("tp"), dtype=torch.long)
        comm.all_gather_into_tensor(out, torch.tensor([dist.get_rank()]), groups.tp)
        seen.append((id(groups.tp), id(groups.dp), out.tolist()))
        ps.destroy_model_parallel(groups)
    return seen


def test_pooled_ranks_reuse_groups_with_the_same_members():
    first, other, again = run_distributed(2, _groups_across_two_layouts)[1]
    assert again[:2] == first[:2], "TP=2 groups were rebuilt instead of reused"
    assert other[0] != first[0], "TP=1 must not get the TP=2 group"
    assert (first[2], other[2], again[2]) == ([0, 1], [1], [0, 1])
