"""Each autograd collective on its own (TP/SP mappings, the summed statistic, the MoE all-to-all): forward and
backward against values built from every rank's input."""
import torch
import torch.distributed as dist

from megalite.moe.collectives import all_to_all
from megalite.tensor_parallel import mappings as m
from megalite.testing import run_distributed


def _inputs(rank: int, shape=(4, 3, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _check_all_mappings():
    group, rank, size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    xs = [_inputs(r)[0] for r in range(size)]
    gs = [_inputs(r)[1] for r in range(size)]
    errors = {}

    def run(name, fn, x, grad, want_y, want_dx):
        x = x.clone().requires_grad_()
        y = fn(x)
        y.backward(grad)
        errors[name] = max((y - want_y).abs().max().item(), (x.grad - want_dx).abs().max().item())

    total_g = sum(gs)
    run("copy_to_tp", lambda x: m.copy_to_tensor_parallel_region(x, group), xs[0], gs[rank], xs[0], total_g)
    run("reduce_from_tp", lambda x: m.reduce_from_tensor_parallel_region(x, group), xs[rank], gs[0], sum(xs), gs[0])
    g_own_last = gs[rank][..., : 8 // size]
    run("scatter_to_tp", lambda x: m.scatter_to_tensor_parallel_region(x, group), xs[0], g_own_last,
        xs[0].chunk(size, -1)[rank], torch.cat([g[..., : 8 // size] for g in gs], -1))
    run("gather_from_tp", lambda x: m.gather_from_tensor_parallel_region(x, group), xs[rank][..., :2],
        gs[rank][..., : 2 * size], torch.cat([x[..., :2] for x in xs], -1),
        gs[rank][..., : 2 * size].chunk(size, -1)[rank])
    g_own_rows = gs[rank][: 4 // size]
    run("scatter_to_sp", lambda x: m.scatter_to_sequence_parallel_region(x, group), xs[0], g_own_rows,
        xs[0].chunk(size, 0)[rank], torch.cat([g[: 4 // size] for g in gs], 0))
    full_rows = torch.cat([x[:1] for x in xs], 0)
    run("gather_from_sp_partial", lambda x: m.gather_from_sequence_parallel_region(x, group), xs[rank][:1],
        gs[rank][:size], full_rows, sum(g[:size] for g in gs)[rank : rank + 1])
    run("gather_from_sp_split", lambda x: m.gather_from_sequence_parallel_region(x, group, grad_is_partial=False),
        xs[rank][:1], gs[rank][:size], full_rows, gs[rank][rank : rank + 1])
    run("reduce_scatter_to_sp", lambda x: m.reduce_scatter_to_sequence_parallel_region(x, group), xs[rank],
        g_own_rows, sum(xs).chunk(size, 0)[rank], torch.cat([g[: 4 // size] for g in gs], 0))

    # Uneven all-to-all: rank r sends (r + j) % 3 rows to rank j.
    splits = [[(r + j) % 3 for j in range(size)] for r in range(size)]
    rows = [torch.arange(sum(splits[r]), dtype=torch.float64).unsqueeze(1) * 10 + r for r in range(size)]
    offsets = [[sum(splits[r][:j]) for j in range(size)] for r in range(size)]
    expect = torch.cat([rows[r][offsets[r][rank] : offsets[r][rank] + splits[r][rank]] for r in range(size)])
    x = rows[rank].clone().requires_grad_()
    y = all_to_all(x, group, [splits[r][rank] for r in range(size)], splits[rank])
    y.backward(y.detach() * 2)  # each row comes home doubled
    errors["all_to_all"] = max((y - expect).abs().max().item(), (x.grad - 2 * rows[rank]).abs().max().item())

    # A statistic summed over the group that every rank's own loss term uses: each input gets every rank's gradient.
    run("sum_over_group", lambda x: m.sum_over_group(x, group), xs[rank], gs[rank], sum(xs), total_g)
    return errors


def test_every_mapping_forward_and_backward_on_4_ranks():
    for rank, errors in enumerate(run_distributed(4, _check_all_mappings)):
        assert len(errors) == 10
        for name, err in errors.items():
            assert err < 1e-12, (rank, name, err)


def test_every_mapping_forward_and_backward_on_2_ranks():
    for rank, errors in enumerate(run_distributed(2, _check_all_mappings)):
        for name, err in errors.items():
            assert err < 1e-12, (rank, name, err)
