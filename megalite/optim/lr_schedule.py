"""Learning-rate schedules as pure functions of the iteration: linear warmup, then constant, linear, cosine or
WSD (warmup-stable-decay) down to the minimum learning rate."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"
    wsd_decay_iters: int | None = None
    """WSD: length of the final decay phase (default 10% of `decay_iters`)."""

    def __post_init__(self) -> None:
        if self.style not in ("constant", "linear", "cosine", "WSD"):
            raise ValueError(f"unknown --lr-decay-style {self.style!r}")

    def __call__(self, iteration: int) -> float:
        """Learning rate for optimizer step `iteration` (0-based)."""
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.max_lr * (iteration + 1) / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if iteration >= self.decay_iters:
            return self.min_lr
        span = self.max_lr - self.min_lr
        if self.style == "WSD":
            decay = self.wsd_decay_iters if self.wsd_decay_iters is not None else max(1, self.decay_iters // 10)
            start = self.decay_iters - decay
            if iteration < start:
                return self.max_lr
            return self.max_lr - span * (iteration - start) / decay
        progress = (iteration - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            return self.max_lr - span * progress
        return self.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_from_config(training, train_iters: int) -> LRSchedule:
    """The schedule a `TrainingConfig` asks for (decay over --lr-decay-iters, default the whole run)."""
    decay_iters = training.lr_decay_iters or train_iters
    warmup = training.lr_warmup_iters
    if training.lr_warmup_fraction is not None:
        warmup = int(training.lr_warmup_fraction * decay_iters)
    return LRSchedule(max_lr=training.lr, min_lr=training.min_lr, warmup_iters=warmup, decay_iters=decay_iters,
                      style=training.lr_decay_style, wsd_decay_iters=training.lr_wsd_decay_iters)
