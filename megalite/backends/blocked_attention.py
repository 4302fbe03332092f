"""Causal attention as row blocks of ordinary matrix products: the CPU kernel of the 'auto' back-end for short
sequences.

Query rows [a, e) attend keys [0, e) only, so the products skip the blocks above the diagonal (with blocks of 32
rows, (n + 1) / 2n of the full s x s scores); the query heads of a K/V group share one product ([r x rows, d] x
[d, e]: grouped-query attention repeats nothing; per-head products with a broadcast K/V measured 40% slower). A
head's results are bit for bit the same whatever heads and batch rows sit beside it (tested: TP and DP splits
compare exactly). The forward keeps each block's probabilities for the backward,
which needs no recomputation: dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)) scale, dQ = dS K,
dK += dS^T Q.

Why: on one CPU thread PyTorch's flash kernel runs causal attention of 4 heads (2 groups) x 256 x 64 in ~6.5 ms
forward + backward and these blocks in ~5 ms; in `megalite bench moe`'s training step the difference is larger
(docs/benchmarks.md). The kept probabilities cost b x hq x s^2 / 2 numbers per layer, so 'auto' takes this kernel
only up to `MAX_SCORES` and SDPA's flash kernel (which keeps none) beyond.
"""
from __future__ import annotations

import torch

BLOCK = 32
"""Query rows per block."""
MAX_SCORES = 1 << 22
"""Largest b x hq x s^2 for which 'auto' picks this kernel on CPU (at most ~8 MiB of fp32 probabilities kept per
layer)."""


def blocked_usable(q: torch.Tensor, k: torch.Tensor, causal: bool, dropout_p: float) -> bool:
    """Whether 'auto' runs `blocked_causal_attention` for these inputs: CPU, fp32/fp64, causal, no dropout, equal
    lengths, at most `MAX_SCORES` scores."""
    b, hq, s, _ = q.shape
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and causal and dropout_p == 0.0
            and k.size(2) == s and b * hq * s * s <= MAX_SCORES)


def _blocks(s: int) -> list[tuple[int, int]]:
    return [(a, min(a + BLOCK, s)) for a in range(0, s, BLOCK)]


def kept_probabilities(s: int) -> int:
    """Probabilities the forward keeps per batch row and query head for `s` rows: rows x keys of every block."""
    return sum((e - a) * e for a, e in _blocks(s))


def _rows(x: torch.Tensor, groups: int, a: int, e: int) -> torch.Tensor:
    """Rows [a, e) of [b, hq, s, d] as [b, groups, hq / groups x (e - a), d]: a K/V group's query heads stacked."""
    b, hq, _, d = x.shape
    return x[:, :, a:e].reshape(b, groups, hq // groups * (e - a), d)


def _put_rows(dst: torch.Tensor, groups: int, a: int, e: int, rows: torch.Tensor) -> None:
    """The inverse of `_rows`: write [b, groups, hq / groups x (e - a), d] into rows [a, e) of `dst` [b, hq, s, d]."""
    b, hq, _, d = dst.shape
    dst[:, :, a:e] = rows.view(b, hq, e - a, d)


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        groups, r = k.size(1), q.size(1) // k.size(1)
        # [b, s, hq, d] in memory, as SDPA's flash kernels return it: the model's [s, b, hq x d] projection input is
        # then a view of it, not a second copy kept for backward
        b, hq, s, d = q.shape
        out = q.new_empty(b, s, hq, d).transpose(1, 2)
        probs = []
        for a, e in _blocks(s):
            scores = torch.matmul(_rows(q, groups, a, e), k[:, :, :e].transpose(-1, -2)).mul_(scale)
            above = torch.ones(e - a, e - a, dtype=torch.bool, device=q.device).triu_(1)
            scores.view(*scores.shape[:2], r, e - a, e)[..., a:].masked_fill_(above, float("-inf"))
            p = torch.softmax(scores, dim=-1)
            _put_rows(out, groups, a, e, torch.matmul(p, v[:, :, :e]))
            probs.append(p)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *probs = ctx.saved_tensors
        groups, scale = k.size(1), ctx.scale
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        delta = (dout * out).sum(-1, keepdim=True)  # rowsum(dO * O) [b, hq, s, 1]
        for (a, e), p in zip(_blocks(q.size(2)), probs):
            do = _rows(dout, groups, a, e)
            dv[:, :, :e] += torch.matmul(p.transpose(-1, -2), do)
            ds = torch.matmul(do, v[:, :, :e].transpose(-1, -2)).sub_(_rows(delta, groups, a, e)).mul_(p).mul_(scale)
            _put_rows(dq, groups, a, e, torch.matmul(ds, k[:, :, :e]))
            dk[:, :, :e] += torch.matmul(ds.transpose(-1, -2), _rows(q, groups, a, e))
        return dq, dk, dv, None


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T scale) v of q [b, hq, s, d], k and v [b, hkv, s, d] (see the module docstring)."""
    return _BlockedCausalAttention.apply(q, k, v, scale)
