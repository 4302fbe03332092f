"""Router auxiliary losses reach the gradient without the training loop knowing about them.

The router computes its load-balancing and z-losses and attaches them to its combine weights with
`attach_aux_loss`: forward passes the weights through unchanged, backward also feeds the model's current aux-loss
scale (`ModelContext.aux_losses.scale`) as the gradient of the loss, so autograd adds scale x d(loss)/d(router
logits). The step sets the scale to the factor it multiplies each microbatch's LM loss by (e.g. 1 / num_microbatches,
times 1 / DP when the per-microbatch loss is a token mean and gradients are summed over DP), so the total gradient is
that of LM loss + coeff x aux loss averaged like the LM loss. The values for the log line are kept on the same
`AuxLosses` object.
"""
from __future__ import annotations

import torch

from megalite.context import AuxLosses


class _AuxLossAutoScaler(torch.autograd.Function):
    """forward: `x` unchanged; backward: `x`'s gradient unchanged, and the scale of `aux` (read when the backward
    runs) as the gradient of `loss`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, aux: AuxLosses) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.aux = aux
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.aux.scale), None


def attach_aux_loss(x: torch.Tensor, loss: torch.Tensor, aux: AuxLosses) -> torch.Tensor:
    """`x`, carrying the scalar `loss` into the backward pass (see the module docstring)."""
    return _AuxLossAutoScaler.apply(x, loss, aux)
