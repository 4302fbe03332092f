"""Pipeline schedules as data: the types of the per-rank action lists (`Action`, `Schedule`) and of the costs
they are planned and replayed with (`Costs`).

Vocabulary
- stage: a slice of consecutive layers. Stage 0 holds the embedding, the last stage (`num_stages - 1`) the loss.
- chunk: a stage's local index on its rank (0..num_chunks-1); `Schedule.stage(rank, chunk)` gives the stage.
- F: forward of one microbatch through one chunk. B: its backward; with `split_backward` B computes the input
  gradients only and W, later, the weight gradients; without it B computes both and there is no W. A
  `forward_only` schedule (inference, evaluation) has F only.
- SEND_F / RECV_F carry activations to the next stage, SEND_B / RECV_B gradients to the previous one. A stage
  boundary inside one rank (zb-v's turn on the last rank) needs no message.

Contract with the runtime: it executes each rank's list in order. A run of consecutive messages is posted as one
batch (sends first; batch_isend_irecv); the rank then waits for the batch's receives, and may wait for its sends
lazily or at once (NCCL group semantics): the lists cannot deadlock either way. Between two ranks, the k-th send
from `a` to `b` is matched by the k-th receive on `b` from `a` (the order NCCL and gloo match untagged messages
in), so no tags are needed. `megalite.pipeline.validate.validate` proves a schedule keeps this contract.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]
COMPUTE_KINDS = ("F", "B", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")

_ACTION_TEXT = re.compile(r"(send|recv)?([FBW])(\d+)\.(\d+)(?:([<>])(\d+))?")


class ScheduleError(ValueError):
    """A schedule whose action lists cannot be executed as the runtime contract says."""


@dataclass(frozen=True)
class Costs:
    """Time of each pass of one microbatch through one full stage (a pp-th of the layers), and of one message."""

    f: float = 1.0
    b: float = 1.0
    """Backward to the input gradients; a schedule that does not split the backward pays b + w per B."""
    w: float = 1.0
    comm: float = 0.0
    """Latency of one message (activations or gradients) from send to receive."""

    def __post_init__(self) -> None:
        if min(self.f, self.b) <= 0 or min(self.w, self.comm) < 0:
            raise ValueError(f"f and b must be positive, w and comm not negative (got {self})")

    def duration(self, schedule: Schedule, kind: str) -> float:
        """Time of one F, B or W of `schedule`: a chunk holds 1/num_chunks of a stage's layers."""
        full = {"F": self.f, "B": self.b if schedule.split_backward else self.b + self.w, "W": self.w}[kind]
        return full / schedule.num_chunks


@dataclass(frozen=True)
class Action:
    """One step of one pipeline rank.

    `chunk` is the local model chunk on this rank. For a message it is the chunk that produced the data (send) or
    that will consume it (receive), and `peer` is the pipeline rank on the other end. Printed compactly:
    `F0.3` forward of chunk 0, microbatch 3; `sendF0.3>2` its activations to rank 2; `recvB1.0<3` the gradient
    for chunk 1, microbatch 0, from rank 3.
    """

    kind: Kind
    chunk: int
    microbatch: int
    peer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPUTE_KINDS + COMM_KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}")
        if (self.peer is None) != (self.kind in COMPUTE_KINDS):
            raise ValueError(f"{self.kind} {'needs' if self.peer is None else 'takes no'} peer rank")

    @property
    def is_comm(self) -> bool:
        """True for sends and receives."""
        return self.peer is not None

    def __str__(self) -> str:
        if self.peer is None:
            return f"{self.kind}{self.chunk}.{self.microbatch}"
        verb, data = self.kind.lower().split("_")
        return f"{verb}{data.upper()}{self.chunk}.{self.microbatch}{'>' if verb == 'send' else '<'}{self.peer}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """The action printed as `text` (inverse of str)."""
        m = _ACTION_TEXT.fullmatch(text)
        if m is None or bool(m[1]) != bool(m[5]) or (m[1] == "send") != (m[5] == ">") or (m[1] and m[2] == "W"):
            raise ValueError(f"not an action: {text!r} (examples: F0.3, W1.2, sendF0.3>2, recvB1.0<3)")
        kind = f"{m[1].upper()}_{m[2]}" if m[1] else m[2]
        return cls(kind, int(m[3]), int(m[4]), int(m[6]) if m[6] else None)


@dataclass
class Schedule:
    """The per-rank action lists of one pipeline schedule, and where each stage lives."""

    name: str
    pp: int
    num_microbatches: int
    num_chunks: int
    split_backward: bool
    """True: B computes input gradients only and W the weight gradients; False: B does both, no W."""
    actions: list[list[Action]]
    v_shape: bool = False
    """Stage placement: False puts chunk c of rank r at stage c*pp + r; True (zb-v) puts chunk 0 of rank r at
    stage r and chunk 1 at stage 2*pp - 1 - r, so rank 0 holds both the first and the last stage."""
    forward_only: bool = False
    """True: only F and their SEND_F / RECV_F (inference, evaluation); no B, no W."""

    @property
    def num_stages(self) -> int:
        return self.pp * self.num_chunks

    def stage(self, rank: int, chunk: int) -> int:
        """The global stage of `chunk` on `rank` (0 = embedding, num_stages - 1 = loss)."""
        if self.v_shape and chunk == 1:
            return 2 * self.pp - 1 - rank
        return chunk * self.pp + rank

    def location(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) holding `stage`; the inverse of `stage`."""
        if self.v_shape and stage >= self.pp:
            return 2 * self.pp - 1 - stage, 1
        return stage % self.pp, stage // self.pp

    def format(self, comm: bool = True) -> str:
        """One line per rank, `rank 0: F0.0 F0.1 B0.0 ...`; `comm=False` leaves out the messages."""
        return "\n".join(f"rank {r}: " + " ".join(str(a) for a in acts if comm or not a.is_comm)
                         for r, acts in enumerate(self.actions))

    def __str__(self) -> str:
        return self.format()
