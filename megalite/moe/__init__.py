"""Mixture of experts with expert parallelism: top-k router, all-to-all token dispatcher, local experts, MoE layer.

The training loop needs three calls: `set_aux_loss_scale` (once, the scale of one microbatch's loss),
`pop_aux_losses` (the per-layer load-balancing and z-loss values for the log line) and `update_expert_biases`
(after each optimizer step, for aux-loss-free balancing). See docs/moe.md.
"""
from megalite.moe.aux_loss import pop_aux_losses, set_aux_loss_scale
from megalite.moe.dispatcher import AllToAllDispatcher
from megalite.moe.layer import MoELayer, update_expert_biases
from megalite.moe.router import TopKRouter

__all__ = [
    "AllToAllDispatcher", "MoELayer", "TopKRouter", "pop_aux_losses", "set_aux_loss_scale", "update_expert_biases",
]
