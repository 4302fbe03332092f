"""Logging of a run: Python `logging` lines with time and rank, the per-interval line on the logging rank,
TensorBoard and Weights & Biases scalars, pipeline bubbles."""
from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

from megalite import comm
from megalite.arguments import to_argv
from megalite.engine.setup import Run
from megalite.errors import ConfigError


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


LOG = logging.getLogger("megalite")


class _RankFilter(logging.Filter):
    """Adds the rank to every record (the launcher's RANK before the process group exists)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(
            os.environ.get("RANK", "0"))
        return True


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of each record (it may be replaced after set-up)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging() -> logging.Logger:
    """The 'megalite' logger, writing 'YYYY-MM-DD HH:MM:SS [rank R] message' lines to stdout (set up once)."""
    if not LOG.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler.addFilter(_RankFilter())
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    return LOG


def duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Logger:
    """Log lines on the logging rank (Python `logging`, with time and rank), and the scalars to TensorBoard
    (--tensorboard-dir) and Weights & Biases (--wandb-project). Keeps the last losses for the end-of-run summary."""

    def __init__(self, run: Run):
        t = run.config.training
        self.enabled = run.logs
        self.log = configure_logging()
        self.writer = self.wandb = None
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        if self.enabled and t.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(t.tensorboard_dir)
        if self.enabled and t.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--wandb-project needs the wandb package: pip install wandb") from e
            self.wandb = wandb.init(project=t.wandb_project, name=t.wandb_exp_name, dir=t.wandb_save_dir,
                                    config={"args": to_argv(run.config)}, reinit="finish_previous")

    def line(self, text: str) -> None:
        if self.enabled:
            self.log.info(text)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
