"""Router auxiliary losses reach the gradient without the training loop knowing about them.

The router computes its load-balancing and z-losses and attaches them to its combine weights with
`attach_aux_loss`: forward passes the weights through unchanged, backward also feeds `scale` as the gradient of the
loss, so autograd adds scale x d(loss)/d(router logits). The training loop sets `scale` once with
`set_aux_loss_scale` to the factor it multiplies each microbatch's LM loss by (e.g. 1 / num_microbatches, times
1 / DP when the per-microbatch loss is a token mean and gradients are summed over DP), so the total gradient is that
of LM loss + coeff x aux loss averaged like the LM loss. Values for the log line are kept per layer and read with
`pop_aux_losses`.
"""
from __future__ import annotations

import torch

_SCALE = 1.0
_LOGGED: dict[str, list[torch.Tensor]] = {}


def set_aux_loss_scale(scale: float) -> None:
    """The factor applied to every aux loss gradient (the same factor as the LM loss of one microbatch)."""
    global _SCALE
    _SCALE = float(scale)


def reset_aux_losses() -> None:
    """Back to the state of a fresh process: scale 1, nothing logged."""
    set_aux_loss_scale(1.0)
    _LOGGED.clear()


def record_aux_loss(name: str, value: torch.Tensor) -> None:
    """Keep one microbatch's value of a logged loss (detached; converted to a float only when popped)."""
    _LOGGED.setdefault(name, []).append(value.detach())


def pop_aux_losses() -> dict[str, float]:
    """Each logged loss (e.g. 'load_balancing_loss/layer0') averaged over the microbatches since the last call."""
    means = {name: torch.stack(values).mean().item() for name, values in _LOGGED.items()}
    _LOGGED.clear()
    return means


def in_recomputation() -> bool:
    """True while autograd runs a backward pass: a forward seen then is activation recomputation, whose side
    effects (logging, token counts) were already recorded by the original forward."""
    return torch._C._current_graph_task_id() != -1


class _AuxLossAutoScaler(torch.autograd.Function):
    """forward: `x` unchanged; backward: `x`'s gradient unchanged, and the current scale as the gradient of `loss`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, _SCALE)


def attach_aux_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`x`, carrying the scalar `loss` into the backward pass (see the module docstring)."""
    return _AuxLossAutoScaler.apply(x, loss)
