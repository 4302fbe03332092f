"""Vocab-parallel log_probs and entropy: against float64 autograd references on the full logits, in one process
and on TP groups of 4 and of 2 gloo ranks (two groups within a pool of 4), with the collectives they issue counted."""
import pytest
import torch
import torch.distributed as dist

from megalite import comm
from megalite.tensor_parallel.log_probs import entropy, log_probs
from megalite.testing import run_distributed

VOCAB = 48
SHAPE = (3, 5)  # [s, b]


def _reference(z: torch.Tensor, targets: torch.Tensor, u_lp: torch.Tensor, u_h: torch.Tensor):
    """log p(target), entropy and their gradients (for upstream gradients u_lp, u_h) in float64 by autograd."""
    z = z.detach().double().requires_grad_()
    lp = torch.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (g_lp,) = torch.autograd.grad(lp, z, u_lp.double())
    h = torch.distributions.Categorical(logits=z).entropy()
    (g_h,) = torch.autograd.grad(h, z, u_h.double())
    return lp.detach(), h.detach(), g_lp, g_h


def _ours(z: torch.Tensor, targets: torch.Tensor, u_lp: torch.Tensor, u_h: torch.Tensor, group):
    z = z.detach().clone().requires_grad_()
    lp = log_probs(z, targets, group)
    (g_lp,) = torch.autograd.grad(lp, z, u_lp)
    h = entropy(z, group)
    (g_h,) = torch.autograd.grad(h, z, u_h)
    return lp.detach(), h.detach(), g_lp, g_h


def _problem(seed: int, scale: float = 3.0, offset: float = 0.0, dtype=torch.float32, shape=SHAPE, vocab=VOCAB):
    """Logits (cast to `dtype`), targets and upstream gradients drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn((*shape, vocab), generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    return z, targets, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _mixed_problem(seed: int):
    """Rows of ordinary logits, logits around 1e4, and logits spread over +-1e4; targets in every rank's slice."""
    z, targets, u_lp, u_h = _problem(seed)
    z[0] += 1e4
    z[1] *= 3e3
    targets.view(-1)[:4] = torch.tensor([0, VOCAB // 4 + 1, VOCAB // 2 + 2, VOCAB - 1])
    return z, targets, u_lp, u_h


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


# --- one process: a group of one rank -------------------------------------------------------------------------

_SCALES = [(3.0, 0.0), (3.0, 1e4), (1e4, 0.0), (1e4, -3e4)]  # (spread, offset) of the logits


@pytest.mark.parametrize("dtype,scale,offset", [
    (dtype, scale, offset)
    for dtype in (torch.float32, torch.bfloat16, torch.float16) for scale, offset in _SCALES
    if dtype != torch.float16 or abs(offset) + 5 * scale < torch.finfo(torch.float16).max
])
def test_one_rank_matches_log_softmax_and_categorical_entropy(world_of_one, dtype, scale, offset):
    z, targets, u_lp, u_h = _problem(7, scale, offset, dtype)
    got = _ours(z, targets, u_lp, u_h, dist.group.WORLD)
    want = _reference(z, targets, u_lp, u_h)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == got[1].shape == SHAPE
    assert got[2].dtype == got[3].dtype == dtype
    # Values are computed in fp32 from exactly representable inputs: fp32 tolerance whatever the input dtype.
    for ours, ref in zip(got[:2], want[:2]):
        _close(ours, ref, rtol=1e-6, atol=1e-6)
    # Gradients are rounded to the logits' dtype at the end: within half an ulp, up to the fp32 error before.
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    for ours, ref in zip(got[2:], want[2:]):
        _close(ours, ref, rtol=rtol, atol=1e-6)


def test_gradcheck_in_float64(world_of_one):
    group = dist.group.WORLD
    for scale, offset in [(1.0, 0.0), (4.0, 50.0)]:
        z, targets, _, _ = _problem(3, scale, offset, torch.float64, shape=(2, 3), vocab=7)
        z.requires_grad_()
        assert torch.autograd.gradcheck(lambda x: log_probs(x, targets, group), (z,))
        assert torch.autograd.gradcheck(lambda x: entropy(x, group), (z,))


def test_minus_infinity_logits_give_zero_probability_and_gradient(world_of_one):
    z, targets, u_lp, u_h = _problem(5)
    z[0, :, : VOCAB // 2] = -float("inf")
    z[1, 2, 3] = -float("inf")
    targets[0] = VOCAB - 1
    targets[1, 2] = 4
    got = _ours(z, targets, u_lp, u_h, dist.group.WORLD)
    want = _reference(z, targets, u_lp, u_h)
    for ours, ref in zip(got[:3], want[:3]):
        _close(ours, ref, rtol=1e-6, atol=1e-6)
    # Categorical's entropy backward multiplies 0 by finfo.min * u, which overflows: differentiate -sum p log p
    # with the masked terms left out instead.
    z64 = z.double().requires_grad_()
    logp = torch.log_softmax(z64, -1)
    h = -(logp.exp() * logp.masked_fill(z == -float("inf"), 0.0)).sum(-1)
    _close(got[1], h.detach(), rtol=1e-6, atol=1e-6)
    _close(got[3], torch.autograd.grad(h, z64, u_h.double())[0], rtol=1e-6, atol=1e-6)
    assert (got[2][0, :, : VOCAB // 2] == 0).all() and (got[3][0, :, : VOCAB // 2] == 0).all()


def test_backward_can_run_twice_and_shapes_are_checked(world_of_one):
    group = dist.group.WORLD
    z, targets, u_lp, u_h = _problem(2)
    z.requires_grad_()
    out = log_probs(z, targets, group) * u_lp + entropy(z, group) * u_h
    first = torch.autograd.grad(out.sum(), z, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(out.sum(), z)[0], first)  # saved tensors are not overwritten
    with pytest.raises(ValueError, match="do not match"):
        log_probs(z, targets[:, :1], group)


# --- several ranks ------------------------------------------------------------------------------------------------

def _vocab_parallel_on_rank(tp: int):
    """Rank r of a TP group of `tp` ranks (ranks [k*tp, (k+1)*tp) form group k) holds slice r of group k's logits."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp == world:
        group = dist.group.WORLD
    else:
        groups = [dist.new_group(list(range(first, first + tp))) for first in range(0, world, tp)]
        group = groups[rank // tp]
    z, targets, u_lp, u_h = _mixed_problem(seed=rank // tp)
    z = z.chunk(tp, -1)[dist.get_rank(group)].clone().requires_grad_()
    counts = {}
    with comm.count_comm() as counts["log_probs forward"]:
        lp = log_probs(z, targets, group)
    with comm.count_comm() as counts["log_probs backward"]:
        (g_lp,) = torch.autograd.grad(lp, z, u_lp)
    with comm.count_comm() as counts["entropy forward"]:
        h = entropy(z, group)
    with comm.count_comm() as counts["entropy backward"]:
        (g_h,) = torch.autograd.grad(h, z, u_h)
    counts = {name: (dict(c.calls), dict(c.bytes)) for name, c in counts.items()}
    return lp.detach(), h.detach(), g_lp, g_h, counts, comm.group_name(group)


@pytest.mark.parametrize("world,tp", [(4, 4), (4, 2)])  # one pool: starting a pool of ranks costs seconds
def test_vocab_parallel_matches_the_full_vocabulary(world, tp):
    results = run_distributed(world, _vocab_parallel_on_rank, tp)
    position_bytes = SHAPE[0] * SHAPE[1] * 4  # one fp32 value per [s, b] position
    for first in range(0, world, tp):
        members = results[first : first + tp]
        lp_ref, h_ref, g_lp_ref, g_h_ref = _reference(*_mixed_problem(seed=first // tp))
        for lp, h, *_ in members:  # the outputs are replicated over the group, bit for bit
            assert torch.equal(lp, members[0][0]) and torch.equal(h, members[0][1])
        _close(members[0][0], lp_ref, rtol=1e-6, atol=1e-6)
        _close(members[0][1], h_ref, rtol=1e-6, atol=1e-6)
        _close(torch.cat([m[2] for m in members], -1), g_lp_ref, rtol=1e-6, atol=1e-7)
        _close(torch.cat([m[3] for m in members], -1), g_h_ref, rtol=1e-6, atol=1e-7)
        for *_, counts, group_name in members:
            key = ("all_reduce", group_name)
            for name in ("log_probs forward", "entropy forward"):  # max and two sums, never the vocabulary
                assert counts[name] == ({key: 3}, {key: 3 * position_bytes}), name
            for name in ("log_probs backward", "entropy backward"):
                assert counts[name] == ({}, {}), name
