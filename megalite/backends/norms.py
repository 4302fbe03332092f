"""RMSNorm and LayerNorm with sharding specs (replicated over TP; gradients summed over TP under sequence
parallelism). LayerNorm is PyTorch's fused kernel; RMSNorm is megalite's own autograd function, which keeps a quarter
of what PyTorch's composite `F.rms_norm` keeps for backward on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.tensor_parallel.sharding import ShardSpec, set_spec


def _replicated(shape: tuple[int, ...], init: str, sequence_parallel: bool) -> torch.nn.Parameter:
    spec = ShardSpec(shape, init=init, replicated_over=("tp",) if sequence_parallel else ())
    return set_spec(torch.nn.Parameter(torch.empty(shape)), spec)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * rstd * w in x's dtype, rstd) with rstd = 1 / sqrt(mean(x^2) + eps), in float32 at least."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), computed in float32 at least.

    Saves only x (in its own dtype) and rstd (float32, one per token), 2 bytes per element in 16-bit. PyTorch's
    composite `F.rms_norm` (CPU, torch 2.13) saves two float32 [tokens, h] tensors: 8 bytes per element.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        normed = x.to(acc) * rstd
        gw = grad.to(acc) * weight.to(acc)
        dx = rstd * (gw - normed * (gw * normed).mean(-1, keepdim=True))
        dweight = (grad.to(acc) * normed).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dweight.to(weight.dtype), None


class RMSNorm(torch.nn.Module):
    """RMSNorm; `zero_centered`: the weight starts at 0 and the layer scales by 1 + weight (--apply-layernorm-1p)."""

    def __init__(self, hidden: int, eps: float, sequence_parallel: bool = False, zero_centered: bool = False):
        super().__init__()
        self.eps, self.offset = eps, 1.0 if zero_centered else 0.0
        self.weight = _replicated((hidden,), "zeros" if zero_centered else "ones", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        if not torch.is_grad_enabled():  # inference: the same arithmetic without an autograd node
            return _rms_norm(x, weight, self.eps)[0]
        return _RMSNormFunction.apply(x, weight, self.eps)


class LayerNorm(torch.nn.Module):
    """LayerNorm; `zero_centered` as for RMSNorm."""

    def __init__(self, hidden: int, eps: float, sequence_parallel: bool = False, zero_centered: bool = False):
        super().__init__()
        self.eps, self.offset = eps, 1.0 if zero_centered else 0.0
        self.weight = _replicated((hidden,), "zeros" if zero_centered else "ones", sequence_parallel)
        self.bias = _replicated((hidden,), "zeros", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        return F.layer_norm(x, (x.shape[-1],), weight, self.bias, self.eps)


def build_norm(kind: str, hidden: int, eps: float, sequence_parallel: bool = False,
               zero_centered: bool = False) -> torch.nn.Module:
    """'RMSNorm' or 'LayerNorm' (`zero_centered`: scale by 1 + weight, Megatron's --apply-layernorm-1p)."""
    if kind == "RMSNorm":
        return RMSNorm(hidden, eps, sequence_parallel, zero_centered)
    if kind == "LayerNorm":
        return LayerNorm(hidden, eps, sequence_parallel, zero_centered)
    raise ValueError(f"unknown normalization {kind!r}: use RMSNorm or LayerNorm")
