"""Ring attention (p2p and all_gather) against full float64 attention, its bytes against the formula, and the
zigzag balance of work; one distributed call per world size runs every case."""
import functools
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from megalite import comm
from megalite import parallel_state as ps
from megalite.backends.attention import attention
from megalite.context_parallel import ring as ring_module
from megalite.context_parallel import ring_attention, ring_attention_comm_bytes, zigzag_shard, zigzag_unshard
from megalite.testing import run_distributed


def reference(q, k, v, causal, scale):
    """Full attention by plain float64 math; K/V head i // (hq // hkv) serves query head i."""
    q, k, v = q.double(), k.double(), v.double()
    owner = torch.arange(q.size(1)) // (q.size(1) // k.size(1))
    scores = q @ k[:, owner].transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(q.size(2), q.size(2), dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v[:, owner]


def reference_grads(q, k, v, dout, causal, scale):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference(*leaves, causal, scale).backward(dout.double())
    return [t.grad for t in leaves]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@dataclass(frozen=True)
class Case:
    comm_type: str
    causal: bool = True
    b: int = 2
    hq: int = 4
    hkv: int = 2
    s: int = 24
    d: int = 16
    dtype: torch.dtype = torch.float32

    def tensors(self):
        """Full-sequence q, k, v and the output gradient, identical on every rank."""
        g = torch.Generator().manual_seed(hash((self.s, self.hq, self.hkv)) % 2**31)
        shapes = [(self.b, self.hq, self.s, self.d), (self.b, self.hkv, self.s, self.d),
                  (self.b, self.hkv, self.s, self.d), (self.b, self.hq, self.s, self.d)]
        return [torch.randn(shape, generator=g).to(self.dtype) for shape in shapes]


def cases(cp):
    lengths = {2: (8, 24, 64), 4: (16, 48, 64)}[cp]
    found = [Case(c, True, 2, hq, hkv, s) for c in ("p2p", "all_gather") for hq, hkv in ((4, 4), (4, 2))
             for s in lengths]
    found += [Case(c, False) for c in ("p2p", "all_gather")]
    found += [Case(c, b=1, hq=4, hkv=2, s=64, d=16) for c in ("p2p", "all_gather")]  # the documented byte table
    found += [Case(c, s=8 * cp, dtype=torch.bfloat16) for c in ("p2p", "all_gather")]
    return found


def _run_case(case, group, group_ranks, cp_rank, cp, heads):
    """This rank's output shard, gradient shards, bytes moved per phase and the score blocks it computed."""
    q, k, v, dout = (zigzag_shard(t, 2, cp_rank, cp) for t in case.tensors())
    q, dout = q[:, heads[0]], dout[:, heads[0]]
    k, v = k[:, heads[1]].requires_grad_(), v[:, heads[1]].requires_grad_()
    q.requires_grad_()
    blocks = []

    def recording(q_block, k_block, v_block, *, causal, scale, mask=None):
        assert mask is None
        blocks.append((q_block.size(2), k_block.size(2), causal))
        return forward(q_block, k_block, v_block, causal=causal, scale=scale)

    forward = ring_module.attention_forward_with_lse
    with mock.patch.object(ring_module, "attention_forward_with_lse", recording), comm.count_comm() as fwd_bytes:
        out = ring_attention(q, k, v, group=group, group_ranks=group_ranks, causal=case.causal,
                             comm_type=case.comm_type)
    with comm.count_comm() as bwd_bytes:
        out.backward(dout)
    return {"out": out.detach(), "grads": [t.grad for t in (q, k, v)], "forward": _by_kind(fwd_bytes),
            "backward": _by_kind(bwd_bytes), "blocks": blocks}


def _by_kind(counter):
    return {kind: counter.total(kind) for kind, _ in counter.bytes}


def _all_cases(cp, cp_cases, tp_cases):
    """Every CP=`cp` case over the whole world, then (world 4 only) the TP=2 x CP=2 cases with heads split."""
    groups = ps.initialize_model_parallel(cp=cp)
    every = slice(None), slice(None)
    results = {"cp": [_run_case(c, groups.cp, groups.ranks["cp"], groups.rank("cp"), cp, every) for c in cp_cases]}
    if tp_cases:
        ps.destroy_model_parallel(groups)
        groups = ps.initialize_model_parallel(tp=2, cp=2)
        tp_rank = groups.rank("tp")
        results["tp"] = [
            _run_case(c, groups.cp, groups.ranks["cp"], groups.rank("cp"), 2,
                      (slice(tp_rank * c.hq // 2, (tp_rank + 1) * c.hq // 2),
                       slice(tp_rank * c.hkv // 2, (tp_rank + 1) * c.hkv // 2)))
            for c in tp_cases
        ]
        results["tp_rank"], results["cp_rank"] = tp_rank, groups.rank("cp")
    results["cp_ranks"] = groups.ranks["cp"]
    return results


TP_CASES = [Case("p2p", hq=4, hkv=2, s=16), Case("all_gather", hq=8, hkv=4, s=24)]


@functools.cache
def ring_run(cp):
    """Every case of CP size `cp` (and at world size 4 the TP x CP cases) in one distributed call, run once."""
    return run_distributed(cp, _all_cases, cp, cases(cp), TP_CASES if cp == 4 else [])


def _check_against_reference(case, outs, grads, tol):
    q, k, v, dout = case.tensors()
    want_out = reference(q, k, v, case.causal, case.d ** -0.5)
    want_grads = reference_grads(q, k, v, dout, case.causal, case.d ** -0.5)
    assert rel_err(outs, want_out) < tol, case
    for name, got, want in zip("qkv", grads, want_grads):
        assert rel_err(got, want) < tol, (name, case)


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_full_attention_forward_and_backward(cp):
    results = ring_run(cp)
    for i, case in enumerate(cases(cp)):
        per_rank = [r["cp"][i] for r in results]
        out = zigzag_unshard([r["out"] for r in per_rank], dim=2)
        grads = [zigzag_unshard([r["grads"][j] for r in per_rank], dim=2) for j in range(3)]
        assert out.dtype == case.dtype and all(g.dtype == case.dtype for g in grads)
        _check_against_reference(case, out, grads, 1e-5 if case.dtype == torch.float32 else 3e-2)


def test_ring_attention_with_heads_split_over_tp():
    results = ring_run(4)
    for i, case in enumerate(TP_CASES):
        by_tp = {}
        for r in sorted(results, key=lambda r: r["cp_rank"]):
            by_tp.setdefault(r["tp_rank"], []).append(r["tp"][i])
        unshard = lambda get: torch.cat(  # noqa: E731  cp along the sequence, then tp along the heads
            [zigzag_unshard([get(r) for r in by_tp[t]], dim=2) for t in (0, 1)], dim=1)
        out = unshard(lambda r: r["out"])
        grads = [unshard(lambda r, j=j: r["grads"][j]) for j in range(3)]
        _check_against_reference(case, out, grads, 1e-5)
    assert {tuple(r["cp_ranks"]) for r in results} == {(0, 2), (1, 3)}


@pytest.mark.parametrize("cp", [2, 4])
def test_bytes_moved_match_the_formula_exactly(cp):
    results = ring_run(cp)
    for i, case in enumerate(cases(cp)):
        shard = (case.b, case.hkv, case.s // cp, case.d)
        want = ring_attention_comm_bytes(shard, case.dtype, cp, case.comm_type)
        for r in results:
            assert r["cp"][i]["forward"] == want["forward"] and r["cp"][i]["backward"] == want["backward"], case


def test_formula_for_the_documented_layer():
    """b=1, hkv=2, s=64, d=16, fp32: one rank's K+V shard is 2 * 1 * 2 * (64/cp) * 16 * 4 bytes."""
    kv2, kv4 = 2 * 2 * 32 * 16 * 4, 2 * 2 * 16 * 16 * 4
    assert ring_attention_comm_bytes((1, 2, 32, 16), torch.float32, 2, "p2p") == {
        "forward": {"send": kv2, "recv": kv2}, "backward": {"send": 2 * kv2, "recv": 2 * kv2}}
    assert ring_attention_comm_bytes((1, 2, 16, 16), torch.float32, 4, "p2p")["backward"]["send"] == 3 * 2 * kv4
    assert ring_attention_comm_bytes((1, 2, 16, 16), torch.float32, 4, "all_gather") == {
        "forward": {"all_gather": kv4}, "backward": {"reduce_scatter": 4 * kv4}}
    # bf16: K/V travel in bf16, dK/dV in fp32
    assert ring_attention_comm_bytes((1, 2, 32, 16), torch.bfloat16, 2, "p2p")["backward"]["send"] == kv2 // 2 + kv2


@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_p2p_gives_every_rank_the_same_scores_at_every_step(cp):
    """Step 0: the causal diagonal (2c x 2c); every later step: c x 2c or 2c x c full scores, on every rank."""
    results = ring_run(cp)
    for i, case in enumerate(cases(cp)):
        if case.comm_type != "p2p" or not case.causal:
            continue
        c = case.s // (2 * cp)
        for r in results:
            blocks = r["cp"][i]["blocks"]
            assert len(blocks) == cp and blocks[0] == (2 * c, 2 * c, True)
            assert [(sq * sk, causal) for sq, sk, causal in blocks[1:]] == [(2 * c * c, False)] * (cp - 1), blocks


@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_all_gather_gives_every_rank_the_same_total_scores(cp):
    results = ring_run(cp)
    for i, case in enumerate(cases(cp)):
        if case.comm_type != "all_gather" or not case.causal:
            continue
        c = case.s // (2 * cp)
        attended = [sum(sq * (sk + 1) // 2 if causal else sq * sk for sq, sk, causal in r["cp"][i]["blocks"])
                    for r in results]
        assert attended == [(2 * cp - 1) * c * c + c * (c + 1)] * cp


def test_one_cp_rank_is_plain_attention_without_communication(solo_groups):
    q, k, v, dout = Case("p2p", s=12).tensors()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for comm_type in ("p2p", "all_gather"):
        with comm.count_comm() as counter:
            out = ring_attention(*leaves, group=solo_groups.cp, group_ranks=[0], comm_type=comm_type)
            out.backward(dout)
        assert counter.total() == 0
        torch.testing.assert_close(out, attention(q, k, v, backend="eager"), rtol=1e-6, atol=1e-6)


def test_bad_arguments_fail_clearly(solo_groups):
    q, k, v, _ = Case("p2p", s=12).tensors()
    with pytest.raises(ValueError, match="--cp-comm-type"):
        ring_attention(q, k, v, group=solo_groups.cp, group_ranks=[0], comm_type="ring")
    with pytest.raises(ValueError, match="not in the context-parallel group"):
        ring_attention(q, k, v, group=solo_groups.cp, group_ranks=[1])
    with pytest.raises(ValueError, match="zigzag shards"):
        ring_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], group=solo_groups.cp, group_ranks=[0])
    assert dist.get_rank() == 0
