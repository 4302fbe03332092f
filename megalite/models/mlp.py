"""The dense MLP of a transformer layer, and the choice between it and an MoE layer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megalite.config import ModelConfig
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class MLP(torch.nn.Module):
    """fc1 (column-parallel; [gate; up] for SwiGLU) -> GeLU or SwiGLU -> fc2 (row-parallel)."""

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, *, sequence_parallel: bool, output_std: float,
                 ffn_hidden_size: int | None = None):
        super().__init__()
        ffn = ffn_hidden_size or cfg.ffn_hidden_size
        self.swiglu = cfg.swiglu
        bias = not cfg.disable_bias_linear
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, ffn * (2 if cfg.swiglu else 1), groups.tp, bias=bias,
                                        sequence_parallel=sequence_parallel, std=cfg.init_method_std,
                                        stride=2 if cfg.swiglu else 1)
        self.fc2 = RowParallelLinear(ffn, cfg.hidden_size, groups.tp, bias=bias,
                                     sequence_parallel=sequence_parallel, std=output_std)

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


def build_mlp(cfg: ModelConfig, groups: ProcessGroups, layer: int, sequence_parallel: bool) -> torch.nn.Module:
    """The feed-forward block of global layer `layer`: dense, or MoE on every --moe-layer-freq-th layer."""
    if cfg.num_experts and layer % cfg.moe_layer_freq == 0:
        from megalite.moe import MoELayer  # imported here: the MoE layer builds its shared expert from `MLP`

        return MoELayer(cfg, groups, layer, sequence_parallel)
    return MLP(cfg, groups, sequence_parallel=sequence_parallel, output_std=output_std(cfg))
