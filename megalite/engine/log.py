"""Logging of a run: the per-interval log line on the logging rank, TensorBoard scalars, pipeline bubbles."""
from __future__ import annotations

import torch

from megalite import comm
from megalite.engine.setup import Run
from megalite.validation import ConfigError


def bubbles(run: Run, bubble: float) -> str:
    """This rank's pipeline bubble gathered from every pipeline rank (collective over the PP group)."""
    mine = torch.tensor([bubble], dtype=torch.float64, device=run.device)
    every = torch.empty(run.groups.size("pp"), dtype=torch.float64, device=run.device)
    comm.all_gather_into_tensor(every, mine, run.groups.pp)
    return "/".join(f"{b:.2f}" for b in every.tolist())


def aux_loss_summary(values: dict[str, float]) -> str:
    """' | load balancing loss 0.1234 | z loss ...': each MoE aux loss averaged over the layers that log it."""
    out = ""
    for kind in ("load_balancing_loss", "z_loss"):
        layer_values = [v for k, v in values.items() if k.startswith(kind)]
        if layer_values:
            out += f" | {kind.replace('_', ' ')} {sum(layer_values) / len(layer_values):.4f}"
    return out


class Logger:
    """Log lines on the logging rank, optionally TensorBoard scalars."""

    def __init__(self, run: Run):
        self.enabled = run.logs
        self.writer = None
        if self.enabled and run.config.training.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(run.config.training.tensorboard_dir)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
