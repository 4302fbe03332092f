"""The token dispatcher on its own: the uneven ETP collectives, the exact identity-expert round trip (weighted
combine; with dropped pairs, experts and whole ranks that receive no tokens) on EP = 2 and 4 and with ETP = 2, and
the all-to-all bytes of each direction against tokens x top-k x hidden x element size."""
import torch
import torch.distributed as dist

from megalite import comm
from megalite import parallel_state as ps
from megalite.moe import AllToAllDispatcher
from megalite.moe.collectives import all_gather_rows, reduce_scatter_rows
from megalite.testing import run_distributed

E, K, H, T = 8, 2, 4, 6


def _uneven_collectives() -> dict[str, float]:
    """Rank r holds (r + 1) % 3 rows (rank 2 none); check both directions against every rank's values."""
    group, rank, size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    sizes = [(r + 1) % 3 for r in range(size)]
    rows = [torch.arange(sizes[r] * 3, dtype=torch.float64).view(-1, 3) + 100 * r for r in range(size)]
    grads = [torch.full((sum(sizes), 3), float(r + 1), dtype=torch.float64) for r in range(size)]
    x = rows[rank].clone().requires_grad_()
    y = all_gather_rows(x, group, sizes)
    y.backward(grads[rank])
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    errors = {"gather": (y - torch.cat(rows)).abs().max().item(),
              "gather_grad": (x.grad - sum(grads)[mine]).abs().max().item() if sizes[rank] else 0.0}
    full = torch.arange(sum(sizes) * 3, dtype=torch.float64).view(-1, 3) * (rank + 1)
    x = full.clone().requires_grad_()
    y = reduce_scatter_rows(x, group, sizes)
    y.backward(torch.ones_like(y) * (rank + 1))
    expect = sum(torch.arange(sum(sizes) * 3, dtype=torch.float64).view(-1, 3) * (r + 1) for r in range(size))
    grad_expect = torch.cat([torch.ones(sizes[r], 3, dtype=torch.float64) * (r + 1) for r in range(size)])
    errors["reduce_scatter"] = (y - expect[mine]).abs().max().item() if sizes[rank] else float(y.numel())
    errors["reduce_scatter_grad"] = (x.grad - grad_expect).abs().max().item()
    return errors


def test_uneven_gather_and_reduce_scatter_rows_on_4_ranks():
    for errors in run_distributed(4, _uneven_collectives):
        assert errors == {"gather": 0.0, "gather_grad": 0.0, "reduce_scatter": 0.0, "reduce_scatter_grad": 0.0}


def _tokens(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens (row t = 1000 rank + t + column / 10, all distinct), experts and keep mask.
    Experts 6 and 7 never receive a token (with EP = 4 the last EP rank receives nothing); the routing weights are
    `_weights(rank)`."""
    t = torch.arange(T)
    x = (1000.0 * rank + t).unsqueeze(1) + torch.arange(H) / 10
    first = (t + rank) % 6
    indices = torch.stack([first, (first + 1 + rank % 2) % 6], 1)
    keep = (t.unsqueeze(1) + torch.arange(K) + rank) % 3 != 0
    return x, indices, keep


def _weights(rank: int) -> torch.Tensor:
    return torch.rand(T, K, generator=torch.Generator().manual_seed(100 + rank))


def _round_trip(layouts: list[tuple[int, int]]) -> list[dict]:
    """Identity experts (each ETP rank returns rows / ETP, so the reduce-scatter sums back to the rows): every token
    comes back as the weighted sum of its kept pairs, and the gradients of the tokens and weights are exact."""
    results = []
    for ep, etp in layouts:
        groups = ps.initialize_model_parallel(ep=ep, etp=etp)
        dispatcher = AllToAllDispatcher(E, groups)
        x, indices, keep = _tokens(dist.get_rank())
        out = {}
        for name, mask in [("dropless", None), ("dropping", keep)]:
            xx, weights = x.clone().requires_grad_(), _weights(dist.get_rank()).requires_grad_()
            rows, per_expert, state = dispatcher.dispatch(xx, indices, mask)
            y = dispatcher.combine(rows / etp, state, weights)
            grad = torch.randn(T, H, generator=torch.Generator().manual_seed(dist.get_rank()))
            y.backward(grad)
            kept = torch.ones(T, K, dtype=torch.bool) if mask is None else mask
            kept_weights = (weights.detach() * kept).unsqueeze(-1)  # [T, K, 1]
            senders = groups.ranks["tp_ep"]  # this EP group and those of the ETP peers
            expected_rows = []
            for j in range(dispatcher.num_local):
                expert = dispatcher.first_local + j
                sent = [_tokens(r) for r in senders]
                expected_rows.append(torch.cat([
                    sx[(si == expert).logical_and(sk if mask is not None else torch.ones_like(sk)).any(1)]
                    for sx, si, sk in sent]))
            ok_rows = all(torch.equal(got[got[:, 0].argsort()], want[want[:, 0].argsort()])
                          for got, want in zip(rows.split(per_expert), expected_rows))
            out[name] = dict(
                per_expert=per_expert, expected_per_expert=[len(r) for r in expected_rows], rows_ok=ok_rows,
                out_ok=torch.equal(y, (x.unsqueeze(1) * kept_weights).sum(1)),
                grad_ok=torch.equal(xx.grad, (grad.unsqueeze(1) * kept_weights).sum(1)),
                weight_grad_ok=torch.equal(weights.grad, (grad * x).sum(-1, keepdim=True) * kept),
            )
        results.append(out)
        ps.destroy_model_parallel(groups)
    return results


def _check_round_trips(world: int, layouts: list[tuple[int, int]]) -> None:
    """Every rank's rows, counts, returned pairs and input gradient are exactly the expected ones."""
    results = run_distributed(world, _round_trip, layouts)
    for rank, per_layout in enumerate(results):
        for (ep, etp), out in zip(layouts, per_layout):
            for name, r in out.items():
                where = (ep, etp, name, rank)
                assert r["per_expert"] == r["expected_per_expert"], where
                assert r["rows_ok"] and r["out_ok"] and r["grad_ok"] and r["weight_grad_ok"], where
    for i, (ep, etp) in enumerate(layouts):  # experts 6 and 7 receive nothing; with EP = 4 neither does rank 3
        idle = [rank for rank, r in enumerate(results) if r[i]["dropless"]["per_expert"][-2:] == [0, 0]]
        assert idle == ([3] if ep == 4 else [r for r in range(world) if r % (ep * etp) >= etp])


def test_identity_round_trip_is_exact_on_ep2_ep4_and_ep2_etp2():
    _check_round_trips(4, [(2, 1), (4, 1), (2, 2)])


def _bytes_per_direction(ep: int, etp: int, tokens: int, hidden: int) -> dict[str, int]:
    """All-to-all bytes over the EP group of each direction of one dispatch + combine (dropless, fp32)."""
    groups = ps.initialize_model_parallel(ep=ep, etp=etp)
    dispatcher = AllToAllDispatcher(E, groups)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    indices = torch.rand(tokens, E, generator=gen).topk(K, -1).indices
    key = ("all_to_all", comm.group_name(groups.ep))
    measured = {}
    with comm.count_comm() as c:
        rows, _, state = dispatcher.dispatch(x, indices)
    measured["dispatch forward"] = c.bytes[key]
    expert_out = rows.detach().requires_grad_()
    with comm.count_comm() as c:
        y = dispatcher.combine(expert_out, state, torch.ones(tokens, K))
    measured["combine forward"] = c.bytes[key]
    with comm.count_comm() as c:
        (grad_rows,) = torch.autograd.grad(y, expert_out, torch.ones_like(y))
    measured["combine backward"] = c.bytes[key]
    with comm.count_comm() as c:
        rows.backward(grad_rows)
    measured["dispatch backward"] = c.bytes[key]
    ps.destroy_model_parallel(groups)
    return measured


def test_all_to_all_bytes_each_way_match_tokens_topk_hidden_element_size():
    """Per rank, a dispatch sends exactly its T k h x 4 bytes; over the ranks every direction moves sum T k h x 4."""
    tokens, hidden = 64, 32
    per_rank = run_distributed(4, _bytes_per_direction, 4, 1, tokens, hidden)
    formula = tokens * K * hidden * 4
    for measured in per_rank:
        assert measured["dispatch forward"] == formula
    for direction in per_rank[0]:
        assert sum(m[direction] for m in per_rank) / (len(per_rank) * formula) == 1.0, direction
