"""AdamW on fp32 main parameters, with bf16/fp16 model weights, global gradient-norm clipping and fp16 dynamic
loss scaling. Gradients come from `GradReducer` (`param.main_grad`, fp32, already reduced)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite import comm
from megalite.config import TrainingConfig
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel.sharding import get_spec


@dataclass
class LossScaler:
    """Dynamic loss scale: halve on overflow (never below `min_scale`), double after `window` clean steps."""

    scale: float
    min_scale: float = 1.0
    window: int = 1000
    clean_steps: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.min_scale, self.scale / 2)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.window == 0:
                self.scale *= 2


def counted_once(p: torch.nn.Parameter, groups: ProcessGroups) -> bool:
    """Whether this rank's copy of `p` counts towards the global gradient norm: each distinct shard exactly once
    over all ranks (first rank of its data-parallel group, and of its TP/ETP group if not split there)."""
    spec = get_spec(p)
    if groups.rank(spec.data_parallel_group) != 0:
        return False
    return spec.dim is not None or groups.rank(spec.group) == 0


def global_grad_norm(grads: list[torch.Tensor], counted: list[bool]) -> float:
    """L2 norm of all gradients over all ranks, each shard counted once; one all-reduce over the world."""
    device = grads[0].device if grads else torch.device("cpu")
    local = torch.zeros(1, dtype=torch.float64, device=device)
    mine = [g for g, c in zip(grads, counted) if c]
    if mine:  # per-tensor norms (no float64 copy of every gradient), squared and summed in float64
        local += torch.stack(torch._foreach_norm(mine)).double().pow(2).sum()
    comm.all_reduce(local, dist.group.WORLD)
    return math.sqrt(local.item())


class MixedPrecisionAdamW:
    """AdamW over fp32 main copies of the model's parameters (the parameters themselves when they are fp32).

    Weight decay skips biases and other 1-D parameters. `step` unscales (fp16), skips the step on inf/NaN,
    clips the global norm and copies the updated main weights back into the model.
    """

    def __init__(self, params: list[torch.nn.Parameter], groups: ProcessGroups, cfg: TrainingConfig,
                 not_counted: list[torch.nn.Parameter] = ()):
        self.params = [p for p in params if p.requires_grad]
        self.main = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        excluded = {id(p) for p in not_counted}
        self.counted = [counted_once(p, groups) and id(p) not in excluded for p in self.params]
        decay = [m for p, m in zip(self.params, self.main) if p.ndim > 1]
        no_decay = [m for p, m in zip(self.params, self.main) if p.ndim <= 1]
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        )
        self.clip_grad = cfg.clip_grad
        self.scaler = LossScaler(cfg.initial_loss_scale, cfg.min_loss_scale, cfg.loss_scale_window) if cfg.fp16 else None

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler else 1.0

    def step(self, lr: float) -> tuple[float | None, bool]:
        """One update with learning rate `lr`; returns (grad norm, skipped). A skipped step has norm None."""
        for p, m in zip(self.params, self.main):
            m.grad = p.main_grad
        if self.scaler is not None:
            inv = 1.0 / self.scaler.scale
            found = torch.zeros(1, device=self.main[0].device)
            for m in self.main:
                m.grad.mul_(inv)
                found += (~torch.isfinite(m.grad)).any().float()
            comm.all_reduce(found, dist.group.WORLD, op=dist.ReduceOp.MAX)
            overflow = bool(found.item())
            self.scaler.update(overflow)
            if overflow:
                return None, True
        norm = global_grad_norm([m.grad for m in self.main], self.counted)
        if not math.isfinite(norm):
            return norm, True
        if self.clip_grad > 0 and norm > self.clip_grad:
            coef = self.clip_grad / (norm + 1e-6)
            for m in self.main:
                m.grad.mul_(coef)
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.main):
                if p is not m:
                    p.copy_(m)
        return norm, False

    def reload_from_model(self) -> None:
        """Take the main weights from the model (after loading model weights without optimizer state)."""
        with torch.no_grad():
            for p, m in zip(self.params, self.main):
                if p is not m:
                    m.copy_(p)

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(), "main": [m.detach().clone() for m in self.main],
                "loss_scale": self.scaler.scale if self.scaler else None,
                "clean_steps": self.scaler.clean_steps if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state["adam"])
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.main, state["main"]):
                m.copy_(saved)
                if p is not m:
                    p.copy_(saved)
        if self.scaler is not None and state["loss_scale"] is not None:
            self.scaler.scale, self.scaler.clean_steps = state["loss_scale"], state["clean_steps"]
