"""Per-token log-probabilities of targets and softmax entropies from vocab-parallel logits, without gathering
the vocabulary.

Rank i of the TP group holds logits z [..., v/t] for vocabulary ids [i*v/t, (i+1)*v/t). Forward issues only
all-reduces of [...]-shaped tensors (the max, then sums); backward needs no communication, provided the incoming
gradient is the same on every rank (the outputs are replicated over the group). Everything is computed in
max(fp32, logits dtype) from max-subtracted logits, and the backward recomputes the softmax slice from the saved
logits and [...]-shaped statistics instead of keeping an fp32 copy of the slice; the gradient has the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megalite import comm


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if dist.get_world_size(group) > 1:
        comm.all_reduce(x, group, op=op)


def _shifted(logits: torch.Tensor, logits_max: torch.Tensor, finite: bool = False) -> torch.Tensor:
    """z - max as one new tensor in the compute dtype (that of `logits_max`); with `finite`, -inf logits become
    finfo.min so that exp(s) * s is 0, not nan."""
    shifted = torch.sub(logits, logits_max.unsqueeze(-1))
    return shifted.clamp_(min=torch.finfo(shifted.dtype).min) if finite else shifted


def _global_max(logits: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    logits_max = logits.amax(dim=-1).to(_compute_dtype(logits))  # max of the stored values: the cast is exact
    _all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
    return logits_max


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(target) = (z_target - m) - log(sum_v exp(z_v - m)), m = max_v z_v, from vocab-split logits [..., v/t].

    forward: three all-reduces of [...]-shaped tensors over the TP group (max, target logit, sum of exps).
    backward: (onehot(target) - softmax) times the incoming gradient on this rank's slice, the softmax recomputed
    from the saved logits, max and log-sum; no communication.
    """

    @staticmethod
    def forward(ctx, logits, targets, group):
        per_rank = logits.shape[-1]
        logits_max = _global_max(logits, group)
        shifted = _shifted(logits, logits_max)
        local_target = targets.long() - dist.get_rank(group) * per_rank
        outside = (local_target < 0) | (local_target >= per_rank)
        local_target = local_target.masked_fill_(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill_(outside, 0.0)
        _all_reduce(target_logit, group)
        sum_exp = shifted.exp_().sum(dim=-1)
        _all_reduce(sum_exp, group)
        log_sum = sum_exp.log_()
        ctx.save_for_backward(logits, logits_max, log_sum, local_target, outside)
        return target_logit - log_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, logits_max, log_sum, local_target, outside = ctx.saved_tensors
        grad_out = grad_out.to(logits_max.dtype)
        grad = _shifted(logits, logits_max).sub_(log_sum.unsqueeze(-1)).exp_()  # softmax slice
        grad.mul_(-grad_out.unsqueeze(-1))
        grad.scatter_add_(-1, local_target.unsqueeze(-1), grad_out.masked_fill(outside, 0.0).unsqueeze(-1))
        return grad.to(logits.dtype), None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """H = log(sum_v e_v) - sum_v e_v s_v / sum_v e_v with s = z - max z, e = exp(s), from vocab-split logits.

    forward: three all-reduces of [...]-shaped tensors over the TP group (max, sum of exps, sum of exp * s).
    backward: dH/dz_v = -softmax_v (s_v - sum_u softmax_u s_u) times the incoming gradient on this rank's slice,
    recomputed from the saved logits and [...]-shaped statistics; no communication.
    """

    @staticmethod
    def forward(ctx, logits, group):
        logits_max = _global_max(logits, group)
        shifted = _shifted(logits, logits_max, finite=True)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, group)
        sum_exp_shifted = exp.mul_(shifted).sum(dim=-1)
        _all_reduce(sum_exp_shifted, group)
        log_sum = sum_exp.log()
        mean_shifted = sum_exp_shifted.div_(sum_exp)  # E_softmax[s]
        ctx.save_for_backward(logits, logits_max, log_sum, mean_shifted)
        return log_sum - mean_shifted

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, logits_max, log_sum, mean_shifted = ctx.saved_tensors
        grad_out = grad_out.to(logits_max.dtype)
        shifted = _shifted(logits, logits_max, finite=True)
        softmax = torch.sub(shifted, log_sum.unsqueeze(-1)).exp_()
        grad = shifted.sub_(mean_shifted.unsqueeze(-1)).mul_(softmax).mul_(-grad_out.unsqueeze(-1))
        return grad.to(logits.dtype), None


def log_probs(logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """log p(targets) per position (shape of `targets`, in max(fp32, logits dtype)) from vocab-parallel `logits`
    [..., v/t]; `targets` are global vocabulary ids in [0, v)."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)}")
    return _VocabParallelLogProbs.apply(logits, targets, group)


def entropy(logits: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Entropy of softmax(z) per position (shape logits.shape[:-1], in max(fp32, logits dtype)) from
    vocab-parallel `logits` [..., v/t]."""
    return _VocabParallelEntropy.apply(logits, group)
