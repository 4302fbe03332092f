"""The MoE layer (router -> all-to-all dispatch -> local experts -> combine, plus an optional shared expert), and
the aux-loss-free expert-bias update.

The layer takes and returns activations exactly as the dense MLP does: [s, b, h] replicated over TP, or [s/t, b, h]
under sequence parallelism. Every TP rank routes different tokens: under SP its own s/t rows; without SP it keeps its
1/t slice of the (identical) rows before routing and all-gathers the output afterwards, so no token is routed or
computed twice. Everything after the slice runs over the expert grid (EP, ETP), whatever the dense TP is.
"""
from __future__ import annotations

import torch

from megalite import comm
from megalite.config import ModelConfig
from megalite.context import ModelContext
from megalite.models.mlp import MLP, output_std
from megalite.moe.dispatcher import AllToAllDispatcher
from megalite.moe.experts import LocalExperts
from megalite.moe.router import TopKRouter
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import mappings
from megalite.tensor_parallel.layers import linear, sequence_parallel
from megalite.tensor_parallel.sharding import ShardSpec, set_spec


class MoELayer(torch.nn.Module):
    """Mixture of experts in place of the dense MLP of global layer `layer`.

    Parameters: `router.weight` [E, h]; `experts.<global index>.fc1.weight` / `.fc2.weight` for the local experts;
    `shared_expert.*` (a dense tensor-parallel MLP every token goes through) with
    --moe-shared-expert-intermediate-size, and `shared_expert_gate` [1, h] with --moe-shared-expert-gate (the shared
    expert's output times sigmoid(x W_g), per token).
    """

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, context: ModelContext, layer: int):
        super().__init__()
        ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        if not cfg.num_experts or ffn is None:
            raise ValueError("an MoE layer needs --num-experts and --moe-ffn-hidden-size (or --ffn-hidden-size)")
        if not 1 <= cfg.moe_router_topk <= cfg.num_experts:
            raise ValueError(f"--moe-router-topk {cfg.moe_router_topk} must be between 1 and --num-experts "
                             f"{cfg.num_experts}")
        self.tp_group, self.context = groups.tp, context
        self.router = TopKRouter(cfg, groups, context, layer)
        self.dispatcher = AllToAllDispatcher(cfg.num_experts, groups)
        self.experts = LocalExperts(cfg, groups, context, ffn, output_std(cfg))
        self.shared_expert = self.shared_expert_gate = None
        if cfg.moe_shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, groups, context, output_std=output_std(cfg),
                                     ffn_hidden_size=cfg.moe_shared_expert_intermediate_size)
        if cfg.moe_shared_expert_gate:
            if self.shared_expert is None:
                raise ValueError("--moe-shared-expert-gate needs a shared expert (--moe-shared-expert-intermediate-size)")
            # under sequence parallelism each TP rank gates other tokens: its gradient is summed over TP
            spec = ShardSpec((1, cfg.hidden_size), std=cfg.init_method_std,
                             replicated_over=("tp",) if sequence_parallel(context, groups.tp) else ())
            self.shared_expert_gate = set_spec(torch.nn.Parameter(torch.empty(spec.local_shape)), spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] (replicated over TP) or [s/t, b, h] (sequence parallel) -> the same shape."""
        split = sequence_parallel(self.context, self.tp_group)
        tokens = x if split else mappings.scatter_to_sequence_parallel_region(x, self.tp_group)
        flat = tokens.reshape(-1, tokens.shape[-1])
        routing = self.router(flat)
        rows, tokens_per_expert, state = self.dispatcher.dispatch(flat, routing.indices, routing.keep)
        pairs = self.dispatcher.combine(self.experts(rows, tokens_per_expert), state)
        y = (pairs * routing.weights.unsqueeze(-1).to(pairs.dtype)).sum(1).view_as(tokens)
        if not split:
            y = mappings.gather_from_sequence_parallel_region(y, self.tp_group, grad_is_partial=False)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(linear(x, self.shared_expert_gate, None, self.context))
            y = y + shared
        return y


@torch.no_grad()
def update_expert_biases(model: torch.nn.Module, groups: ProcessGroups) -> None:
    """Aux-loss-free balancing, after each optimizer step: for every router with an expert bias, sum its token
    counts since the last update over TP x DP x CP (every rank there routes different tokens through the same
    router), then bias += rate x sign(mean count - count), and restart the counts."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None]
    if not routers:
        return
    counts = torch.cat([r.tokens_per_expert for r in routers])
    if groups.size("tp_dp_cp") > 1:
        comm.all_reduce(counts, groups.tp_dp_cp)
    for router, c in zip(routers, counts.split([r.num_experts for r in routers])):
        router.expert_bias += router.cfg.moe_router_bias_update_rate * torch.sign(c.mean() - c)
        router.tokens_per_expert.zero_()
