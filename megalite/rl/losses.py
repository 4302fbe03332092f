"""The RL objective as small pure functions over per-token tensors, and `PolicyLoss`, which puts them on the step
engine (docs/rl.md has every formula with its source).

Notation, per response token t of sequence i: logp = log pi(y_t), old = log pi_old(y_t) (the rollout policy),
ref = log pi_ref(y_t), A_i the sequence's advantage, m_t the response mask, |y_i| = sum of m over the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megalite import comm
from megalite.engine.losses import LossOutput
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import vocab_parallel_entropy, vocab_parallel_log_probs


# ----------------------------------------------------------------------------------------------- pure functions
def kl_estimate(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from a sample of pi (Schulman, "Approximating KL divergence"):
    k1 = logp - ref;  k2 = (logp - ref)^2 / 2;  k3 = exp(ref - logp) - (ref - logp) - 1  (>= 0, unbiased)."""
    d = ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}: k1, k2 or k3")


def clipped_policy_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float,
                        dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a loss, per token: max(-A r, -A clip(r, 1 - low, 1 + high)); with dual clip c,
    for A < 0 at most -c A (Ye et al. 2020). Returns (loss, clipped below, clipped above) with the clip indicators as
    0/1 floats: below = A < 0 and r < 1 - low, above = A > 0 and r > 1 + high (where the clip binds)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    below = ((advantages < 0) & (ratio < 1.0 - clip_low)).float()
    above = ((advantages > 0) & (ratio > 1.0 + clip_high)).float()
    return loss, below, above


def token_ratio(logp: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """GRPO/PPO's per-token importance ratio r_t = exp(logp - old)."""
    return torch.exp(logp - old)


def gspo_token_ratio(logp: torch.Tensor, mean_log_ratio: torch.Tensor) -> torch.Tensor:
    """GSPO's ratio in its token form (Zheng et al. 2025, GSPO-token): s_i,t = sg[s_i] x pi(y_t) / sg[pi(y_t)], with
    s_i = exp(mean over the sequence of (logp - old)), the geometric mean of the token ratios, given per token as
    `mean_log_ratio` (detached). Its value is s_i at every token; its gradient is s_i grad logp_t, so the loss
    averaged over a sequence's tokens has exactly the gradient of sequence-level GSPO."""
    return torch.exp(mean_log_ratio.detach() + logp - logp.detach())


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float, std_normalize: bool = True) -> torch.Tensor:
    """GRPO's group-relative advantages of rewards [n x group_size] ordered by group: (r - mean) / (std + eps) with the
    unbiased std (Dr. GRPO, `std_normalize` False: r - mean). Groups of one sample get 0 (no baseline)."""
    r = rewards.view(-1, group_size).double()
    centred = r - r.mean(1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards)
    if std_normalize:
        centred = centred / (r.std(1, unbiased=True, keepdim=True) + eps)
    return centred.view(-1).to(rewards.dtype)


# --------------------------------------------------------------------------------------------- on the engine
def _sequence_slots(batch: dict[str, torch.Tensor], cp_size: int) -> tuple[torch.Tensor, int]:
    """A slot per (row, sequence) of the microbatch: [b, s] slot ids and the number of slots, the same on every CP
    rank (document ids index the whole row, so they are below its full length s x cp)."""
    b, s = batch["loss_mask"].shape
    docs = batch.get("document_ids")
    if docs is None:
        docs = torch.zeros((b, s), dtype=torch.int64, device=batch["loss_mask"].device)
    width = s * cp_size
    return torch.arange(b, device=docs.device).unsqueeze(1) * width + docs, b * width


def _per_sequence(values: torch.Tensor, slots: torch.Tensor, n: int, cp: torch.distributed.ProcessGroup | None
                  ) -> torch.Tensor:
    """Sum of `values` [b, s] over each sequence, whole sequences (summed over the CP group), detached: [n]."""
    out = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, slots.reshape(-1),
                                                                               values.detach().double().reshape(-1))
    if cp is not None:
        comm.all_reduce(out, cp)
    return out


@dataclass
class PolicyLoss:
    """GRPO or GSPO with KL and entropy terms on the engine. Reads per-token batch fields `labels`, `loss_mask` (the
    response tokens), `old_logprobs`, `advantages` (A_i at each token of sequence i), `ref_logprobs` (when beta > 0)
    and `document_ids` (packed sequences; one sequence per row without it)."""

    clip_low: float
    clip_high: float
    dual_clip: float | None = None
    gspo: bool = False
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    entropy_coeff: float = 0.0
    aggregation: str = "token-mean"

    def _lengths(self, batch, groups: ProcessGroups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots, n = _sequence_slots(batch, groups.size("cp"))
        cp = groups.cp if groups.size("cp") > 1 else None
        lengths = _per_sequence(batch["loss_mask"], slots, n, cp)
        return slots, lengths, lengths.clamp_min(1.0).gather(0, slots.reshape(-1)).view_as(slots)

    def normalizer(self, batch, groups: ProcessGroups) -> torch.Tensor:
        """token-mean: response tokens; otherwise sequences (each counted once over CP: sum of m_t / |y_i|)."""
        mask = batch["loss_mask"]
        if self.aggregation == "token-mean":
            return mask.sum()
        _, _, length = self._lengths(batch, groups)
        return (mask / length).sum().to(mask.dtype)

    def __call__(self, logits: torch.Tensor, batch, groups: ProcessGroups) -> LossOutput:
        mask = batch["loss_mask"]
        logp = vocab_parallel_log_probs(logits, batch["labels"], groups.tp)
        old, adv = batch["old_logprobs"], batch["advantages"]
        needs_lengths = self.gspo or self.aggregation == "seq-mean-token-mean"
        slots, lengths, length = self._lengths(batch, groups) if needs_lengths else (None, None, None)
        if self.gspo:  # s_i needs the whole sequence: its log-ratio sum over the CP group (detached)
            cp = groups.cp if groups.size("cp") > 1 else None
            mean = (_per_sequence((logp - old) * mask, slots, lengths.numel(), cp) /
                    lengths.clamp_min(1.0)).gather(0, slots.reshape(-1)).view_as(slots).to(logp.dtype)
            ratio = gspo_token_ratio(logp, mean)
        else:
            ratio = token_ratio(logp, old)
        loss, below, above = clipped_policy_loss(ratio, adv, self.clip_low, self.clip_high, self.dual_clip)
        # terms and metrics are weighted as the aggregation counts them, so the engine's normaliser turns both into
        # the same kind of mean (per token, or per sequence of per-token sums or means)
        weight = mask / length if self.aggregation == "seq-mean-token-mean" else mask
        metrics = {"clip_low": below, "clip_high": above, "ppo_kl": (old - logp).detach()}
        if self.kl_beta:
            kl = kl_estimate(logp, batch["ref_logprobs"], self.kl_estimator)
            loss = loss + self.kl_beta * kl
            metrics["kl"] = kl.detach()
        if self.entropy_coeff:
            ent = vocab_parallel_entropy(logits, groups.tp)
            loss = loss - self.entropy_coeff * ent
            metrics["entropy"] = ent.detach()
        return LossOutput((loss * weight).sum(), {k: (v * weight).sum() for k, v in metrics.items()})
