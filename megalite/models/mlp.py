"""The dense MLP of a transformer layer (also the MoE layer's shared expert), and its activation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megalite.config import ModelConfig
from megalite.context import ModelContext
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class MLP(torch.nn.Module):
    """fc1 (column-parallel; [gate; up] for SwiGLU) -> GeLU or SwiGLU -> fc2 (row-parallel)."""

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, context: ModelContext, *, output_std: float,
                 ffn_hidden_size: int | None = None):
        super().__init__()
        ffn = ffn_hidden_size or cfg.ffn_hidden_size
        self.swiglu = cfg.swiglu
        bias = not cfg.disable_bias_linear
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, ffn * (2 if cfg.swiglu else 1), groups.tp, context, bias=bias,
                                        std=cfg.init_method_std, stride=2 if cfg.swiglu else 1)
        self.fc2 = RowParallelLinear(ffn, cfg.hidden_size, groups.tp, context, bias=bias, std=output_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.fc1(x), self.swiglu))


def activation(h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """SwiGLU on fc1's [gate; up] halves (of this rank's shard), or GeLU."""
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def output_std(cfg: ModelConfig) -> float:
    """Initialisation std of the layers that write into the residual stream: std / sqrt(2 x layers)."""
    return cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
