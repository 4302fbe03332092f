"""Executes a pipeline schedule's action lists on the real pipeline group.

The runtime does not decide the order: it walks this rank's list. A run of consecutive messages is posted as one
batch_isend_irecv; the rank waits for the batch's receives at once and for its sends at the end of the step.
F runs a chunk forward (the last stage also computes its share of the global-batch loss), B back-propagates one
microbatch through one chunk (with a split backward the linear layers queue their weight-gradient work), W runs
that queue. Every action's start and end are recorded; `bubble` is the idle fraction of the step on this rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from megalite import comm
from megalite.parallel_state import ProcessGroups
from megalite.pipeline.schedules import Action, Schedule
from megalite.tensor_parallel import defer_weight_grads

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]
"""Per-token losses [b, s] and the microbatch -> this microbatch's share of the global-batch loss."""


@dataclass
class StepRecord:
    """Start and end (seconds since the step began) of every action this rank ran."""

    events: list[tuple[str, float, float]] = field(default_factory=list)
    duration: float = 0.0

    @property
    def bubble(self) -> float:
        busy = sum(end - start for name, start, end in self.events if name[0] in "FBW")
        return 1.0 - busy / self.duration if self.duration > 0 else 0.0


class PipelineRuntime:
    """Runs `schedule` for this pipeline rank over its model chunks (`chunks[c]` is local chunk c)."""

    def __init__(self, schedule: Schedule, chunks: list[torch.nn.Module], groups: ProcessGroups,
                 activation_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.schedule, self.chunks, self.groups = schedule, chunks, groups
        self.rank = groups.rank("pp")
        self.pp_ranks = groups.ranks["pp"]
        self.shape, self.dtype, self.device = activation_shape, dtype, device

    def run(self, batches: list[Batch], loss_fn: LossFn, loss_scale: float = 1.0) -> tuple[torch.Tensor, StepRecord]:
        """One step over all microbatches; returns the summed loss (last stage; 0 elsewhere) and the timings."""
        self.batches, self.loss_fn, self.loss_scale = batches, loss_fn, loss_scale
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.output_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.weight_work: dict[tuple[int, int], list[Callable[[], None]]] = {}
        self.total_loss = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.pending_sends: list = []
        record, t0 = StepRecord(), time.perf_counter()
        actions = self.schedule.actions[self.rank]
        i = 0
        while i < len(actions):
            if actions[i].is_comm:
                j = i
                while j < len(actions) and actions[j].is_comm:
                    j += 1
                start = time.perf_counter() - t0
                self._communicate(actions[i:j])
                record.events.append(("comm", start, time.perf_counter() - t0))
                i = j
                continue
            start = time.perf_counter() - t0
            self._compute(actions[i])
            record.events.append((str(actions[i]), start, time.perf_counter() - t0))
            i += 1
        comm.wait_all(self.pending_sends, self.groups.pp)
        record.duration = time.perf_counter() - t0
        return self.total_loss, record

    @torch.no_grad()
    def forward_only(self, batch: Batch) -> torch.Tensor | None:
        """Per-token losses of one microbatch (on the rank holding the last stage; None elsewhere), walking the
        stages in order with blocking messages (evaluation: simple, not pipelined)."""
        hidden, losses = None, None
        for stage in range(self.schedule.num_stages):
            rank, chunk = self.schedule.location(stage)
            prev_rank = self.schedule.location(stage - 1)[0] if stage > 0 else rank
            if rank != self.rank:
                if prev_rank == self.rank:
                    comm.wait_all(comm.batch_isend_irecv([(hidden, self.pp_ranks[rank])], [], self.groups.pp),
                                  self.groups.pp)
                continue
            if prev_rank != self.rank:
                hidden = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                comm.wait_all(comm.batch_isend_irecv([], [(hidden, self.pp_ranks[prev_rank])], self.groups.pp),
                              self.groups.pp)
            last = stage == self.schedule.num_stages - 1
            out = self.chunks[chunk](batch["tokens"] if stage == 0 else None, batch.get("position_ids"),
                                     batch["labels"] if last else None, hidden=hidden)
            if last:
                losses = out
            else:
                hidden = out
        return losses

    def _stage(self, a: Action) -> int:
        return self.schedule.stage(self.rank, a.chunk)

    def _communicate(self, actions: list[Action]) -> None:
        sends, recvs = [], []
        for a in actions:
            key, peer = (a.chunk, a.microbatch), self.pp_ranks[a.peer]
            if a.kind == "SEND_F":
                sends.append((self.outputs[key].detach(), peer))
            elif a.kind == "SEND_B":
                sends.append((self.inputs.pop(key).grad, peer))
            else:
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                recvs.append((buffer, peer))
                if a.kind == "RECV_F":
                    self.inputs[key] = buffer.requires_grad_()
                else:
                    self.output_grads[key] = buffer
        requests = comm.batch_isend_irecv(sends, recvs, self.groups.pp)
        self.pending_sends += requests[: len(sends)]
        comm.wait_all(requests[len(sends):], self.groups.pp)

    def _compute(self, a: Action) -> None:
        key, stage = (a.chunk, a.microbatch), self._stage(a)
        last = stage == self.schedule.num_stages - 1
        if a.kind == "F":
            batch = self.batches[a.microbatch]
            hidden = None
            if stage > 0:
                if key not in self.inputs:  # the previous stage is on this rank (zb-v's turn)
                    _, prev_chunk = self.schedule.location(stage - 1)
                    self.inputs[key] = self.outputs[(prev_chunk, a.microbatch)].detach().requires_grad_()
                hidden = self.inputs[key]
            out = self.chunks[a.chunk](batch["tokens"] if stage == 0 else None, batch.get("position_ids"),
                                       batch["labels"] if last else None, hidden=hidden)
            if last:
                loss = self.loss_fn(out, batch)
                self.total_loss += loss.detach()
                out = loss * self.loss_scale
            self.outputs[key] = out
        elif a.kind == "B":
            out = self.outputs.pop(key)
            grad = None if last else self.output_grads.pop(key, None)
            if grad is None and not last:  # the next stage is on this rank (zb-v's turn)
                _, next_chunk = self.schedule.location(stage + 1)
                grad = self.inputs.pop((next_chunk, a.microbatch)).grad
            if self.schedule.split_backward:
                with defer_weight_grads() as queue:
                    torch.autograd.backward(out, grad)
                self.weight_work[key] = queue
            else:
                torch.autograd.backward(out, grad)
        else:
            for work in self.weight_work.pop(key):
                work()
