"""RMSNorm and LayerNorm with sharding specs (replicated over TP; gradients summed over TP under sequence
parallelism). PyTorch's fused kernels (`F.rms_norm`, `F.layer_norm`) serve CPU and CUDA alike."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.tensor_parallel.sharding import ShardSpec, set_spec


def _replicated(shape: tuple[int, ...], init: str, sequence_parallel: bool) -> torch.nn.Parameter:
    spec = ShardSpec(shape, init=init, replicated_over=("tp",) if sequence_parallel else ())
    return set_spec(torch.nn.Parameter(torch.empty(shape)), spec)


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = _replicated((hidden,), "ones", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(torch.nn.Module):
    def __init__(self, hidden: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = _replicated((hidden,), "ones", sequence_parallel)
        self.bias = _replicated((hidden,), "zeros", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def build_norm(kind: str, hidden: int, eps: float, sequence_parallel: bool = False) -> torch.nn.Module:
    """'RMSNorm' or 'LayerNorm'."""
    if kind == "RMSNorm":
        return RMSNorm(hidden, eps, sequence_parallel)
    if kind == "LayerNorm":
        return LayerNorm(hidden, eps, sequence_parallel)
    raise ValueError(f"unknown normalization {kind!r}: use RMSNorm or LayerNorm")
