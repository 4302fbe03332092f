"""Random state for dropout under tensor parallelism.

The default generator is seeded identically on the ranks of a TP group, so dropout on tensors that every TP rank
holds in full (the residual stream without sequence parallelism) draws the same mask everywhere, as the single
process would. Tensors split over the TP group (attention heads, sequence-parallel activations) draw inside
`tracker.fork()`, a generator seeded per TP rank, so each shard gets its own mask.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

TP_RNG = "tensor-parallel"
_TP_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Named generator states that can temporarily replace the device's default generator."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    def add(self, name: str, seed: int) -> None:
        saved = _get_state(self.device)
        torch.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(saved, self.device)

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG) -> Iterator[None]:
        """Draw from the named generator inside the block; the default generator is untouched."""
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


_TRACKER = RNGTracker()


def get_rng_tracker() -> RNGTracker:
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0, device: torch.device | None = None) -> None:
    """Seed the default generator (same on a TP group, different per pipeline stage) and the per-TP-rank one."""
    base = seed + 100 * pp_rank
    torch.manual_seed(base)
    _TRACKER.device = device or torch.device("cpu")
    _TRACKER.states.clear()
    _TRACKER.add(TP_RNG, base + _TP_SEED_OFFSET + tp_rank)
