"""The MoE layer (router -> all-to-all dispatch -> local experts -> combine, plus an optional shared expert), and
the aux-loss-free expert-bias update.

The layer takes and returns activations exactly as the dense MLP does: [s, b, h] replicated over TP, or [s/t, b, h]
under sequence parallelism. Every TP rank routes different tokens: under SP its own s/t rows; without SP it keeps its
1/t slice of the (identical) flattened [s b] rows before routing and all-gathers the output afterwards, so no token
is routed or computed twice; when the rows do not divide by t (generation's few tokens per step) they are padded
with rows that are routed nowhere. Everything after the slice runs over the expert grid (EP, ETP), whatever the dense TP is.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
        self.tp_group, self.tp_size, self.context = groups.tp, groups.size("tp"), context
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

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> torch.Tensor:
        """x [s, b, h] (replicated over TP) or [s/t, b, h] (sequence parallel) -> the same shape. `replay`
        [b, s, MoE layers, k] (routing replay: the experts of every token of this CP rank's sequence, every MoE
        layer): this layer routes its tokens to their recorded experts."""
        split = sequence_parallel(self.context, self.tp_group)
        flat, pad = x.reshape(-1, x.shape[-1]), 0
        chosen = None
        if replay is not None:  # this layer's experts, s-major like the tokens: [s b, k]
            chosen = replay[:, :, self.moe_index].transpose(0, 1).reshape(-1, replay.shape[-1])
            if split:
                chosen = chosen.view(self.tp_size, -1, chosen.shape[-1])[dist.get_rank(self.tp_group)]
        if not split:
            # each TP rank takes 1/t of the flattened [s b] rows (s-major: the same rows as slicing s); a count
            # that does not divide (generation: few tokens per step) is padded with rows that go nowhere
            pad = -flat.shape[0] % self.tp_size
            if pad and self.training and torch.is_grad_enabled():
                raise ValueError(f"MoE training needs sequence x batch tokens ({flat.shape[0]}) divisible by TP "
                                 f"{self.tp_size}")
            if pad:
                flat = F.pad(flat, (0, 0, 0, pad))
            flat = mappings.scatter_to_sequence_parallel_region(flat, self.tp_group)
            if chosen is not None and self.tp_size > 1:
                chosen = F.pad(chosen, (0, 0, 0, pad)).view(self.tp_size, -1, chosen.shape[-1])[
                    dist.get_rank(self.tp_group)]
        routing = self.router(flat, chosen)
        keep = routing.keep
        if pad:
            real = self._real_rows(flat.shape[0], x.numel() // x.shape[-1]).unsqueeze(1).expand_as(routing.indices)
            keep = real if keep is None else keep & real
        if self.context.routing_record is not None:
            self._record(routing.indices, x.shape[0] * (self.tp_size if split else 1), x.shape[1])
        rows, tokens_per_expert, state = self.dispatcher.dispatch(flat, routing.indices, keep)
        y = self.dispatcher.combine(self.experts(rows, tokens_per_expert), state, routing.weights)
        if not split:
            y = mappings.gather_from_sequence_parallel_region(y, self.tp_group, grad_is_partial=False)
            y = y[: y.shape[0] - pad]
        y = y.view_as(x)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(linear(x, self.shared_expert_gate, None, self.context))
            y = y + shared
        return y

    @property
    def moe_index(self) -> int:
        """This layer's position among the model's MoE layers (its column of a routing-replay tensor)."""
        return sum(self.router.cfg.is_moe_layer(i) for i in range(self.router.layer))

    def _real_rows(self, local_rows: int, real: int) -> torch.Tensor:
        """[local_rows] bool: which of this TP rank's rows are tokens rather than padding."""
        first = dist.get_rank(self.tp_group) * local_rows if self.tp_size > 1 else 0
        return torch.arange(first, first + local_rows, device=self.router.weight.device) < real

    def _record(self, indices: torch.Tensor, s: int, b: int) -> None:
        """Store the experts [s, b, k] of the call's tokens (all TP ranks' rows) in the context's routing record."""
        if self.tp_size > 1:
            gathered = indices.new_empty((self.tp_size * indices.shape[0], indices.shape[1]))
            comm.all_gather_into_tensor(gathered, indices.contiguous(), self.tp_group)
            indices = gathered
        self.context.routing_record[self.router.layer] = indices[: s * b].view(s, b, -1)


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
