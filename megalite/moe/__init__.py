"""Mixture of experts with expert parallelism: top-k router, token dispatcher (all-to-all), local experts, MoE layer.

Besides the layer, the training loop needs `update_expert_biases` (after each optimizer step, for aux-loss-free
balancing); the aux-loss scale and logged values live on the model's `ModelContext`. See docs/moe.md.
"""
from megalite.moe.dispatcher import AllToAllDispatcher, TokenDispatcher
from megalite.moe.layer import MoELayer, update_expert_biases
from megalite.moe.router import TopKRouter

__all__ = ["AllToAllDispatcher", "MoELayer", "TokenDispatcher", "TopKRouter", "update_expert_biases"]
