"""Executes a pipeline schedule's action lists on the real pipeline group (PP = 1 included: schedule 'none').

The runtime does not decide the order: it walks this rank's list. A run of consecutive messages is posted as one
batch_isend_irecv; the rank waits for the batch's receives at once and for its sends at the end of the step.
F runs a chunk forward; on the last stage it hands the logits and the microbatch to the step's function (a loss
share, or a per-token function in a forward-only pass). B back-propagates one microbatch through one chunk (with a
split backward the linear layers queue their weight-gradient work on the model's context), W runs that queue and
hands each weight gradient to the gradient reducer. Before the backward of the step's last microbatch on a chunk
(its last B, and its last W), the runtime tells the reducer, so that buckets whose gradients are complete start
their reduction at once. Every action's start and end are recorded; `bubble` is the idle fraction of the step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from megalite import comm
from megalite.context import WeightGradWork
from megalite.models.gpt import GPTModel
from megalite.optim.ddp import GradReducer
from megalite.parallel_state import ProcessGroups
from megalite.pipeline.actions import Action, Schedule
from megalite.tensor_parallel.layers import sequence_parallel

Batch = dict[str, torch.Tensor]
LossShare = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""Logits and the microbatch -> this microbatch's share of the step's loss (a differentiable scalar) and of its
metrics."""
PerMicrobatch = Callable[[torch.Tensor, Batch], torch.Tensor]
"""Logits and the microbatch -> what a forward-only pass returns for it (e.g. per-token log-probs)."""


@dataclass
class StepRecord:
    """Start and end (seconds since `t0`, a `time.perf_counter()`) of every action this rank ran."""

    t0: float = field(default_factory=time.perf_counter)
    events: list[tuple[str, float, float]] = field(default_factory=list)
    duration: float = 0.0

    @property
    def bubble(self) -> float:
        busy = sum(end - start for name, start, end in self.events if name[0] in "FBW")
        return 1.0 - busy / self.duration if self.duration > 0 else 0.0


@dataclass
class StepSums:
    """The step's loss and metrics summed over this rank's microbatches (zero except on the last stage)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PipelineRuntime:
    """Runs schedules for this pipeline rank over its model chunks (`chunks[c]` is local chunk c, all sharing one
    model context)."""

    def __init__(self, chunks: list[GPTModel], groups: ProcessGroups):
        self.chunks, self.groups = chunks, groups
        self.context = chunks[0].context
        self.rank = groups.rank("pp")
        self.pp_ranks = groups.ranks["pp"]
        self.hidden_size = chunks[0].cfg.hidden_size
        self.dtype = next(chunks[0].parameters()).dtype

    def train(self, schedule: Schedule, batches: list[Batch], loss_share: LossShare, loss_scale: float = 1.0,
              reducer: GradReducer | None = None) -> tuple[StepSums, StepRecord]:
        """Forward and backward of every microbatch; gradients go to `reducer` (or `.grad` without one). Returns the
        summed loss and metrics (last stage; zero elsewhere) and the timings."""
        if schedule.forward_only:
            raise ValueError(f"{schedule.name}: a forward-only schedule cannot train")
        sums = StepSums(torch.zeros(1, dtype=torch.float64, device=batches[0]["tokens"].device))

        def last_stage(logits: torch.Tensor, microbatch: int) -> torch.Tensor:
            share, metrics = loss_share(logits, batches[microbatch])
            sums.loss += share.detach()
            for name, value in metrics.items():
                sums.metrics[name] = sums.metrics.get(name, 0.0) + value.detach().double()
            return share * loss_scale

        record = self._run(schedule, batches, last_stage, reducer)
        return sums, record

    @torch.no_grad()
    def forward_only(self, schedule: Schedule, batches: list[Batch], fn: PerMicrobatch) -> list[torch.Tensor] | None:
        """`fn` of every microbatch's logits, in microbatch order, on the rank holding the last stage (None on the
        others). No graph is kept; the model's train/eval mode is the caller's."""
        if not schedule.forward_only:
            raise ValueError(f"{schedule.name}: build the schedule with forward_only=True for a forward-only pass")
        results: dict[int, torch.Tensor] = {}

        def last_stage(logits: torch.Tensor, microbatch: int) -> torch.Tensor:
            results[microbatch] = fn(logits, batches[microbatch])
            return results[microbatch]

        self._run(schedule, batches, last_stage, None)
        if not any(c.post_process for c in self.chunks):
            return None
        return [results[i] for i in range(len(batches))]

    # ------------------------------------------------------------------------------------------------- execution
    def _run(self, schedule: Schedule, batches: list[Batch], last_stage: Callable[[torch.Tensor, int], torch.Tensor],
             reducer: GradReducer | None) -> StepRecord:
        """Walk this rank's action list; `last_stage` turns the logits of microbatch i into what F keeps."""
        if schedule.num_microbatches != len(batches):
            raise ValueError(f"{schedule.name}: schedule for {schedule.num_microbatches} microbatches, got "
                             f"{len(batches)}")
        self.schedule, self.batches, self.last_stage, self.reducer = schedule, batches, last_stage, reducer
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.output_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.weight_work: dict[tuple[int, int], list[WeightGradWork]] = {}
        self.pending_sends: list = []
        try:
            return self._walk(schedule.actions[self.rank])
        finally:  # nothing of the step (graphs, batches) outlives it
            self.batches, self.inputs, self.outputs, self.output_grads, self.weight_work = [], {}, {}, {}, {}
            self.last_stage, self.reducer = None, None

    def _walk(self, actions: list[Action]) -> StepRecord:
        record = StepRecord()
        i = 0
        while i < len(actions):
            if actions[i].is_comm:
                j = i
                while j < len(actions) and actions[j].is_comm:
                    j += 1
                start = time.perf_counter() - record.t0
                self._communicate(actions[i:j])
                record.events.append(("comm", start, time.perf_counter() - record.t0))
                i = j
                continue
            start = time.perf_counter() - record.t0
            self._compute(actions[i])
            record.events.append((str(actions[i]), start, time.perf_counter() - record.t0))
            i += 1
        comm.wait_all(self.pending_sends, self.groups.pp)
        record.duration = time.perf_counter() - record.t0
        return record

    def _message_shape(self, microbatch: int) -> tuple[int, int, int]:
        """Activations between stages: [s (/TP under sequence parallelism), micro batch, hidden]."""
        b, s = self.batches[microbatch]["tokens"].shape
        if sequence_parallel(self.context, self.groups.tp):
            s //= self.groups.size("tp")
        return s, b, self.hidden_size

    def _communicate(self, actions: list[Action]) -> None:
        sends, recvs = [], []
        for a in actions:
            key, peer = (a.chunk, a.microbatch), self.pp_ranks[a.peer]
            if a.kind == "SEND_F":  # a forward-only pass has no B that needs the output later
                out = self.outputs.pop(key) if self.schedule.forward_only else self.outputs[key]
                sends.append((out.detach(), peer))
            elif a.kind == "SEND_B":
                sends.append((self.inputs.pop(key).grad, peer))
            else:
                device = self.batches[a.microbatch]["tokens"].device
                buffer = torch.empty(self._message_shape(a.microbatch), dtype=self.dtype, device=device)
                recvs.append((buffer, peer))
                if a.kind == "RECV_F":
                    self.inputs[key] = buffer.requires_grad_(torch.is_grad_enabled())
                else:
                    self.output_grads[key] = buffer
        requests = comm.batch_isend_irecv(sends, recvs, self.groups.pp)
        self.pending_sends += requests[: len(sends)]
        comm.wait_all(requests[len(sends):], self.groups.pp)

    def _compute(self, a: Action) -> None:
        key, stage = (a.chunk, a.microbatch), self.schedule.stage(self.rank, a.chunk)
        last = stage == self.schedule.num_stages - 1
        final = a.microbatch == self.schedule.num_microbatches - 1
        if a.kind == "F":
            self._forward(a, stage, last)
        elif a.kind == "B":
            out = self.outputs.pop(key)
            grad = None if last else self.output_grads.pop(key, None)
            if grad is None and not last:  # the next stage is on this rank (zb-v's turn)
                _, next_chunk = self.schedule.location(stage + 1)
                grad = self.inputs.pop((next_chunk, a.microbatch)).grad
            if final and self.reducer is not None:
                self.reducer.last_contributions(a.chunk, "B")
            if self.schedule.split_backward:
                with self.context.deferring_weight_grads() as queue:
                    torch.autograd.backward(out, grad)
                self.weight_work[key] = queue
            else:
                torch.autograd.backward(out, grad)
        else:
            if final and self.reducer is not None:
                self.reducer.last_contributions(a.chunk, "W")
            for work in self.weight_work.pop(key):
                for param, grad in work():
                    self._accumulate(param, grad)

    def _forward(self, a: Action, stage: int, last: bool) -> None:
        key, batch = (a.chunk, a.microbatch), self.batches[a.microbatch]
        hidden = None
        if stage > 0:
            if key not in self.inputs:  # the previous stage is on this rank (zb-v's turn)
                _, prev_chunk = self.schedule.location(stage - 1)
                prev = (prev_chunk, a.microbatch)
                out = self.outputs.pop(prev) if self.schedule.forward_only else self.outputs[prev]
                self.inputs[key] = out.detach().requires_grad_(torch.is_grad_enabled())
            hidden = self.inputs.pop(key) if self.schedule.forward_only else self.inputs[key]
        out = self.chunks[a.chunk](batch["tokens"] if stage == 0 else None, batch.get("position_ids"), hidden,
                                   document_ids=batch.get("document_ids"), routed_experts=batch.get("routed_experts"))
        if last:
            out = self.last_stage(out, a.microbatch)
            if self.schedule.forward_only:
                return
        self.outputs[key] = out

    def _accumulate(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """A weight gradient from the W pass: to the reducer, or into `.grad` without one."""
        if self.reducer is not None:
            self.reducer.add_deferred(param, grad)
        elif param.grad is None:
            param.grad = grad
        else:
            param.grad += grad
