"""Random streams for dropout, owned by a model (its `ModelContext`), never by the process.

A tracker holds named generator states. Dropout draws inside `tracker.fork(name)`, which swaps the named state into
the device's default generator for the block and takes it back afterwards, so the default generator itself is never
advanced and two models in one process draw independently. Two streams:
- `MODEL_RNG`: seeded alike on the ranks of a TP group, for tensors every TP rank holds in full (the residual stream
  without sequence parallelism), so each draws the mask the single process would;
- `TP_RNG`: seeded per TP rank, for tensors split over the TP group (attention heads, sequence-parallel
  activations), so each shard gets its own mask.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODEL_RNG = "model"
TP_RNG = "tensor-parallel"
_TP_SEED_OFFSET = 2718
_PP_SEED_STRIDE = 100


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Named generator states that can temporarily replace the device's default generator."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.device = device or torch.device("cpu")

    @classmethod
    def seeded(cls, seed: int, tp_rank: int = 0, pp_rank: int = 0, device: torch.device | None = None
               ) -> RNGTracker:
        """Both streams of a model on (tp_rank, pp_rank): the model stream alike over TP, the TP stream per rank,
        both different per pipeline stage."""
        tracker = cls(device)
        base = seed + _PP_SEED_STRIDE * pp_rank
        tracker.add(MODEL_RNG, base)
        tracker.add(TP_RNG, base + _TP_SEED_OFFSET + tp_rank)
        return tracker

    def add(self, name: str, seed: int) -> None:
        """A new stream `name` seeded with `seed` (what the device's default generator holds after
        `manual_seed(seed)`; the default generator itself is not touched)."""
        self.states[name] = torch.Generator(self.device).manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Draw from the named stream inside the block; the default generator is untouched."""
        saved = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(saved, self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}
