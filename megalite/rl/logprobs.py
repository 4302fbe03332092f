"""Log-probabilities of whole samples under a model on any layout: the old (rollout policy) and reference
log-probabilities of an RL step, computed in forward-only microbatches and then held by every rank.

Samples i of a set of n are split as the engine splits a global batch (microbatch j of DP rank d holds samples
(j DP + d) mbs ...), run through the pipeline without gradients (eval mode: no dropout), and their per-token
log-probabilities log pi(label_t) (gathered over the vocabulary's TP shards, CP shards put back in order) are summed
into an [n, s] tensor over the DP ranks and the pipeline stages (each sample is written by one DP rank of the last
stage), so every rank has all of them for the training microbatches that follow, whatever their split.
"""
from __future__ import annotations

import torch

from megalite import comm
from megalite.context_parallel import zigzag_unshard
from megalite.engine.batches import microbatches
from megalite.engine.setup import Run
from megalite.engine.step import forward_only
from megalite.tensor_parallel import vocab_parallel_log_probs


def sequence_logprobs(run: Run, samples, micro_batch_size: int) -> torch.Tensor:
    """[n, s] float32 log pi(labels) of every sample of `samples` (a sequence of dicts with `tokens`, `labels` and
    any per-token fields the model reads), on every rank."""
    groups, seq = run.groups, run.config.model.seq_length
    n, dp, cp = len(samples), groups.size("dp"), groups.size("cp")
    per = dp * micro_batch_size
    if n % per:
        raise ValueError(f"{n} samples do not split into microbatches of --ppo-logps-fwd-micro-batch-size "
                         f"{micro_batch_size} on {dp} data-parallel ranks")
    batches = microbatches(samples, 0, n // per, micro_batch_size, seq, groups, run.device, keep_position_ids=True)

    def per_token(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return vocab_parallel_log_probs(logits, batch["labels"], groups.tp).float()

    was_training = run.model.training
    run.model.eval()
    try:
        results = forward_only(run, batches, per_token)
    finally:
        run.model.train(was_training)
    out = torch.zeros((n, seq), dtype=torch.float32, device=run.device)
    for j, logp in enumerate(results or []):
        if cp > 1:
            parts = torch.empty((cp, *logp.shape), dtype=logp.dtype, device=logp.device)
            comm.all_gather_into_tensor(parts.view(-1, logp.shape[1]), logp.contiguous(), groups.cp)
            logp = zigzag_unshard(list(parts.unbind(0)), dim=1)
        start = (j * dp + groups.rank("dp")) * micro_batch_size
        out[start:start + micro_batch_size] = logp
    for kind in ("dp", "pp"):
        if groups.size(kind) > 1:
            comm.all_reduce(out, getattr(groups, kind))
    return out
