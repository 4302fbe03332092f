"""The one step path: every layout (PP = 1 included, schedule 'none') runs its microbatches through the pipeline
runtime, with any `Loss`.

A training step (`forward_backward`): the loss's normaliser summed over the microbatches and DP x CP up front (one
all-reduce), then the schedule's F/B/W actions, each microbatch's loss scaled by 1 / total (`loss_share`), gradients
reduced over DP x CP by the reducer (overlapped with the backward under --overlap-grad-reduce), and the loss and
metrics summed over DP x CP. A forward-only pass (`forward_only`) returns a function of each microbatch's logits on
the last stage (log-probs, per-token losses); evaluation is one. Nothing here keeps state between calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megalite import comm
from megalite.engine.losses import Batch, CrossEntropyLoss, Loss
from megalite.engine.setup import Run
from megalite.moe import update_expert_biases
from megalite.pipeline.runtime import LossShare, PerMicrobatch, PipelineRuntime, StepRecord


@dataclass
class StepResult:
    """A training step's global-batch loss and metrics (on the ranks of the last stage; 0 elsewhere), and this
    rank's pipeline record."""

    loss: float
    metrics: dict[str, float]
    record: StepRecord

    @property
    def bubble(self) -> float:
        """Idle fraction of the step on this rank."""
        return self.record.bubble


def normalizer_total(batches: list[Batch], loss: Loss, run: Run) -> torch.Tensor:
    """The loss's terms in the whole global batch: its normaliser summed over microbatches and DP x CP (at least 1)."""
    local = torch.stack([loss.normalizer(b, run.groups).double() for b in batches]).sum().reshape(1)
    comm.all_reduce(local, run.groups.dp_cp)
    return local.clamp_min(1.0)


def loss_share(loss: Loss, total: torch.Tensor, run: Run) -> LossShare:
    """Each microbatch's share of the global-batch loss (and of its metrics): its sum over `total`."""
    def share(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = loss(logits, batch, run.groups)
        return out.value / total, {name: value / total for name, value in out.metrics.items()}
    return share


def _reduced(values: dict[str, torch.Tensor], run: Run) -> dict[str, float]:
    """Sums over DP x CP in one all-reduce (every rank of a DP x CP group holds the same stage and names)."""
    names = sorted(values)
    packed = torch.cat([values[n].reshape(1).double() for n in names])
    comm.all_reduce(packed, run.groups.dp_cp)
    return dict(zip(names, packed.tolist()))


def forward_backward(run: Run, batches: list[Batch], loss: Loss = CrossEntropyLoss()) -> StepResult:
    """Gradients of the global-batch loss in the reducer's buffers (reduced over DP x CP); the loss and metrics."""
    if run.reducer is None:
        raise ValueError("forward_backward needs a trainable model (a frozen model runs forward_only)")
    total = normalizer_total(batches, loss, run)
    scale = run.optimizer.loss_scale
    # MoE aux losses are means over one DP replica's microbatch: average them over microbatches and DP ranks.
    run.context.aux_losses.scale = scale / (len(batches) * run.groups.size("dp"))
    runtime = PipelineRuntime(run.chunks, run.groups)
    sums, record = runtime.train(run.schedule(len(batches)), batches, loss_share(loss, total, run), scale,
                                 run.reducer)
    run.reducer.finish()
    reduced = _reduced({"loss": sums.loss, **{f"metric/{k}": v for k, v in sums.metrics.items()}}, run)
    metrics = {k.removeprefix("metric/"): v for k, v in reduced.items() if k.startswith("metric/")}
    return StepResult(reduced["loss"], metrics, record)


def forward_only(run: Run, batches: list[Batch], fn: PerMicrobatch) -> list[torch.Tensor] | None:
    """`fn(logits, batch)` of every microbatch on the ranks of the last stage (None on the others), without
    gradients; no reducer or optimizer is touched, so frozen models run it too."""
    return PipelineRuntime(run.chunks, run.groups).forward_only(run.schedule(len(batches), True), batches, fn)


def evaluate(run: Run, batches: list[Batch], loss: Loss = CrossEntropyLoss()) -> float:
    """The loss over `batches` (this rank's microbatches of one or more global batches), normalised like training's
    (mean over the loss's terms), in eval mode; the value on every rank of the last stage."""
    was_training = run.model.training
    run.model.eval()
    try:
        def sums(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            return torch.stack([loss(logits, batch, run.groups).value.double(),
                                loss.normalizer(batch, run.groups).double()])

        results = forward_only(run, batches, sums)
    finally:
        run.model.train(was_training)
    total = torch.stack(results).sum(0) if results is not None else torch.zeros(2, dtype=torch.float64,
                                                                                device=run.device)
    comm.all_reduce(total, run.groups.dp_cp)
    return (total[0] / total[1].clamp_min(1.0)).item()


def optimizer_step(run: Run, lr: float) -> tuple[float | None, bool]:
    """Update the weights (and the MoE expert biases, with --moe-router-enable-expert-bias); returns (grad norm,
    skipped)."""
    grad_norm, skipped = run.optimizer.step(lr)
    if not skipped and run.config.model.moe_router_enable_expert_bias:
        update_expert_biases(run.model, run.groups)
    return grad_norm, skipped
