"""Choosing the next token: greedy, temperature, top-k, top-p, each sample drawing from its own seeded generator.

A sample's generator is keyed by (seed, prompt id, sample index) alone, and a sample draws exactly one uniform number
per generated token, so the same seed gives the same tokens whatever the batch, the replica or the layout (up to
exact ties between logits). All TP ranks of a replica see the same gathered logits and the same generator state, so
they draw the same token without a broadcast.

Sampling from logits z [b, V] (fp32):
- greedy (temperature 0): argmax z;
- otherwise z / T, then top-k keeps the k largest, then top-p keeps the smallest set of the most probable tokens
  whose probability reaches p (the most probable token always stays); the token is drawn by inverting the CDF of
  softmax of what is kept at the sample's uniform u: the first token whose cumulative probability exceeds u.
Log-probabilities are reported under the model (log_softmax z) and under the shaped distribution that was sampled
from (0 for greedy, whose distribution is one-hot).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen (see the module docstring)."""

    temperature: float = 1.0
    """0 is greedy."""
    top_k: int = 0
    """Keep the k most probable tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the most probable tokens up to this total probability; 1 keeps all."""
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_generator(seed: int, prompt_id: int, sample_index: int) -> torch.Generator:
    """The CPU generator of one sample, keyed by (seed, prompt id, sample index) alone."""
    digest = hashlib.sha256(f"megalite-sample/{seed}/{prompt_id}/{sample_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def shape_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits [b, V] (fp32): removed tokens get -inf."""
    z = logits / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(-1) - probs  # probability of the more probable tokens
        ordered = ordered.masked_fill(before >= params.top_p, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, order, ordered)
    return z


@dataclass(frozen=True)
class Draw:
    """The tokens chosen for a batch and their log-probabilities, each [b]."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    """Under the model: log_softmax of the raw logits."""
    sampling_logprobs: torch.Tensor
    """Under the distribution sampled from (after temperature, top-k, top-p)."""


def draw(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> Draw:
    """One token per row of full-vocabulary logits [b, V]; row i draws one uniform from generators[i]."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        tokens = logits.argmax(-1)
        return Draw(tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1), torch.zeros_like(logprobs[:, 0]))
    shaped = torch.log_softmax(shape_logits(logits, params), dim=-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(logits.device)
    cdf = shaped.exp().cumsum(-1)
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    tokens = tokens.clamp(max=logits.shape[-1] - 1)
    pick = tokens.unsqueeze(1)
    return Draw(tokens, logprobs.gather(1, pick).squeeze(1), shaped.gather(1, pick).squeeze(1))
