"""The top-k router: scores, expert choice, capacity dropping, load-balancing and z-losses, expert bias.

Scores are softmax over the experts or a per-expert sigmoid. The k experts with the highest score (plus the expert
bias, when aux-loss-free balancing is on) are chosen; their combine weights are the unbiased scores of the chosen
experts, as they are (`--moe-router-pre-softmax`) or normalised to sum to one over the k chosen. The bias changes
the choice only, never a weight. Routing replay (RL) takes the experts as given and recomputes their weights.

Every rank routes its own tokens (the MoE layer gives each TP rank a different slice), so the load-balancing loss,
which belongs to one microbatch of one data-parallel replica, is assembled over the TP x CP group: token counts are
summed there, and each rank adds only its own tokens' share of the mean scores, so the pieces sum to the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megalite import comm
from megalite.config import ModelConfig
from megalite.context import ModelContext
from megalite.moe.aux_loss import attach_aux_loss
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel.layers import linear
from megalite.tensor_parallel.sharding import ShardSpec, set_spec


@dataclass
class Routing:
    """Where each of T tokens goes."""

    weights: torch.Tensor
    """[T, k] fp32 combine weights."""
    indices: torch.Tensor
    """[T, k] global expert indices."""
    keep: torch.Tensor | None
    """[T, k] bool, False for (token, expert) pairs dropped over capacity; None when dropless."""


def topk_routing(logits: torch.Tensor, topk: int, score_function: str, pre_softmax: bool,
                 expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine weights [T, k] and chosen experts [T, k] from router logits [T, E] (see the module docstring)."""
    scores = torch.softmax(logits, dim=-1) if score_function == "softmax" else torch.sigmoid(logits)
    choice = scores.detach() if expert_bias is None else scores.detach() + expert_bias
    indices = torch.topk(choice, topk, dim=-1).indices
    weights = scores.gather(1, indices)
    if not pre_softmax:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def replayed_routing(logits: torch.Tensor, indices: torch.Tensor, score_function: str, pre_softmax: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing replay: the given experts [T, k], with combine weights computed as `topk_routing` computes them (the
    scores at those experts, normalised over the k unless pre-softmax), so their gradients reach the router."""
    if indices.shape != (logits.shape[0], indices.shape[-1]) or indices.min() < 0 or indices.max() >= logits.shape[1]:
        raise ValueError(f"replayed experts {tuple(indices.shape)} do not fit {logits.shape[0]} tokens of "
                         f"{logits.shape[1]} experts")
    scores = torch.softmax(logits, dim=-1) if score_function == "softmax" else torch.sigmoid(logits)
    weights = scores.gather(1, indices)
    if not pre_softmax:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens one expert may take: ceil(capacity_factor x tokens x k / experts)."""
    return math.ceil(capacity_factor * num_tokens * topk / num_experts)


def capacity_keep(indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int,
                  policy: str) -> torch.Tensor:
    """[T, k] mask of the (token, expert) pairs each expert keeps: at most `capacity` per expert, those with the
    highest weight ('probs') or the earliest tokens ('position'); ties go to the earlier token."""
    experts = indices.reshape(-1)
    if policy == "probs":
        order = torch.argsort(-weights.detach().reshape(-1), stable=True)
    else:
        order = torch.arange(experts.numel(), device=experts.device)
    ordered = experts[order]
    seats = F.one_hot(ordered, num_experts).cumsum(0).gather(1, ordered.unsqueeze(1)).squeeze(1)
    keep = torch.empty_like(experts, dtype=torch.bool)
    keep[order] = seats <= capacity
    return keep.view_as(indices)


def aux_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-token expert probabilities the load-balancing loss uses: softmax, or sigmoids normalised to sum one."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(dim=-1, keepdim=True)


class TopKRouter(torch.nn.Module):
    """Linear router [E, h] (replicated; gradients summed over TP since each TP rank routes other tokens).

    With `--moe-router-enable-expert-bias` it holds the buffer `expert_bias` [E] (saved in checkpoints) and the
    counts of tokens sent to each expert since the last `update_expert_biases` (not saved).
    """

    expert_bias: torch.Tensor | None
    tokens_per_expert: torch.Tensor | None

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, context: ModelContext, layer: int):
        super().__init__()
        self.cfg, self.layer, self.context = cfg, layer, context
        self.num_experts, self.topk = cfg.num_experts, cfg.moe_router_topk
        self.tp_cp_group = groups.tp_cp if groups.size("tp_cp") > 1 else None
        replicated = ("tp",) if groups.size("tp") > 1 else ()
        spec = ShardSpec((cfg.num_experts, cfg.hidden_size), std=cfg.init_method_std, replicated_over=replicated)
        self.weight = set_spec(torch.nn.Parameter(torch.empty(spec.local_shape)), spec)
        bias = cfg.moe_router_enable_expert_bias
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts) if bias else None)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts) if bias else None, persistent=False)

    @property
    def load_balancing(self) -> bool:
        return self.cfg.moe_router_load_balancing_type == "aux_loss" and self.cfg.moe_aux_loss_coeff > 0

    @property
    def z_loss(self) -> bool:
        return bool(self.cfg.moe_z_loss_coeff)

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> Routing:
        """Route tokens x [T, h]; with `replay` [T, k] (routing replay), to those experts, with combine weights from
        the current router's scores at them."""
        cfg = self.cfg
        logits = linear(x, self.weight, None, self.context).float()
        if replay is None:
            weights, indices = topk_routing(logits, self.topk, cfg.moe_router_score_function,
                                            cfg.moe_router_pre_softmax, self.expert_bias)
        else:
            if cfg.moe_expert_capacity_factor is not None:
                raise ValueError("routing replay with --moe-expert-capacity-factor is refused: capacities would drop "
                                 "replayed tokens; train dropless")
            weights, indices = replayed_routing(logits, replay, cfg.moe_router_score_function,
                                                cfg.moe_router_pre_softmax)
        if self.tokens_per_expert is not None and self.training and not self.context.recomputing:
            self.tokens_per_expert += torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        keep = None
        if cfg.moe_expert_capacity_factor is not None:
            capacity = expert_capacity(x.shape[0], self.topk, self.num_experts, cfg.moe_expert_capacity_factor)
            keep = capacity_keep(indices, weights, self.num_experts, capacity, cfg.moe_token_drop_policy)
        if self.training and torch.is_grad_enabled() and (self.load_balancing or self.z_loss):
            weights = attach_aux_loss(weights, self._aux_loss(logits, indices), self.context.aux_losses)
        return Routing(weights, indices, keep)

    def _aux_loss(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of coeff x load-balancing loss + z-coeff x z-loss over the microbatch's tokens on the
        TP x CP group; logs the whole microbatch's values."""
        cfg, num_experts = self.cfg, self.num_experts
        scores = aux_scores(logits, cfg.moe_router_score_function)
        lse_sq = torch.logsumexp(logits, dim=-1).square()
        counts = torch.bincount(indices.reshape(-1), minlength=num_experts).to(logits.dtype)
        totals = torch.cat([counts, scores.detach().sum(0), lse_sq.detach().sum().view(1),
                            logits.new_tensor([logits.shape[0]])])
        if self.tp_cp_group is not None:
            comm.all_reduce(totals, self.tp_cp_group)
        all_counts, all_score_sums, all_lse_sq, all_tokens = totals.split([num_experts, num_experts, 1, 1])
        loss = logits.new_zeros(())
        log = self.context.aux_losses if not self.context.recomputing else None
        if self.load_balancing:
            # E x sum_i f_i P_i with f_i = counts_i / (T k) and P_i = mean score of expert i, T over the TP x CP group.
            norm = num_experts / (all_tokens * all_tokens * self.topk)
            loss = loss + cfg.moe_aux_loss_coeff * (norm * (all_counts * scores.sum(0)).sum()).squeeze()
            if log is not None:
                log.record(f"load_balancing_loss/layer{self.layer}", norm * (all_counts * all_score_sums).sum())
        if self.z_loss:
            loss = loss + cfg.moe_z_loss_coeff * (lse_sq.sum() / all_tokens).squeeze()
            if log is not None:
                log.record(f"z_loss/layer{self.layer}", all_lse_sq / all_tokens)
        return loss
