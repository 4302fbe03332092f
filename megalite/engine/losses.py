"""Losses plug into the step engine: a `Loss` turns the last stage's vocab-parallel logits and a microbatch into the
sum of its terms, and says up front how many terms the microbatch holds.

Under pipeline parallelism a microbatch's backward runs before the step has seen the others, so the normaliser of the
global-batch loss cannot come from the losses themselves. Each loss therefore gives `normalizer(batch)`, the number
of its terms in this rank's part of the microbatch (loss tokens, or sequences), computed from the batch alone; the
engine sums it over the microbatches and the DP x CP ranks before the first forward and scales every microbatch's sum
by 1 / total. Summing the gradients over DP x CP then gives exactly the gradient of the global-batch mean.

A batch is a dict of tensors: per-token fields [b, s, ...] (sharded like the tokens under context parallelism) and
per-sample fields [b, ...]. Logits are [b, s, v/t] (this rank's vocabulary slice, fp32 or the model's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import vocab_parallel_cross_entropy

Batch = dict[str, torch.Tensor]


@dataclass
class LossOutput:
    """One microbatch's contribution: `value`, the differentiable sum of its terms, and named metrics (sums over
    the same terms, detached), which the engine normalises and reduces like the loss."""

    value: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(Protocol):
    """A training objective on the step engine (see the module docstring)."""

    def normalizer(self, batch: Batch, groups: ProcessGroups) -> torch.Tensor:
        """The number of this loss's terms in this rank's part of the microbatch, summed over DP x CP by the engine
        (a per-sequence loss under CP counts each sequence once over the CP group, e.g. b / cp per rank)."""
        ...

    def __call__(self, logits: torch.Tensor, batch: Batch, groups: ProcessGroups) -> LossOutput:
        """The sum of this rank's terms for logits [b, s, v/t] (statistics spanning the sequence are reduced over
        `groups.cp`, vocabulary sums over `groups.tp`)."""
        ...


class CrossEntropyLoss:
    """Pretraining's loss: vocab-parallel cross entropy per token, summed over the loss mask; one term per loss token."""

    def normalizer(self, batch: Batch, groups: ProcessGroups) -> torch.Tensor:
        return batch["loss_mask"].sum()

    def per_token(self, logits: torch.Tensor, batch: Batch, groups: ProcessGroups) -> torch.Tensor:
        """Cross entropy of every position [b, s] (fp32), mask not applied; consumes the logits (their storage
        becomes the saved softmax)."""
        return vocab_parallel_cross_entropy(logits, batch["labels"], groups.tp, in_place=True)

    def __call__(self, logits: torch.Tensor, batch: Batch, groups: ProcessGroups) -> LossOutput:
        return LossOutput((self.per_token(logits, batch, groups) * batch["loss_mask"]).sum())
