"""Pipeline schedules as data: for every pipeline rank, the ordered list of actions it executes.

Vocabulary
- stage: a slice of consecutive layers. Stage 0 holds the embedding, the last stage (`num_stages - 1`) the loss.
- chunk: a stage's local index on its rank (0..num_chunks-1); `Schedule.stage(rank, chunk)` gives the stage.
- F: forward of one microbatch through one chunk. B: its backward; with `split_backward` B computes the input
  gradients only and W, later, the weight gradients; without it B computes both and there is no W.
- SEND_F / RECV_F carry activations to the next stage, SEND_B / RECV_B gradients to the previous one. A stage
  boundary inside one rank (zb-v's turn on the last rank) needs no message.

Contract with the runtime: it executes each rank's list in order. A run of consecutive messages is posted as one
batch (sends first; batch_isend_irecv); the rank then waits for the batch's receives, and may wait for its sends
lazily or at once (NCCL group semantics): the lists cannot deadlock either way. Between two ranks, the k-th send
from `a` to `b` is matched by the k-th receive on `b` from `a` (the order NCCL and gloo match untagged messages
in), so no tags are needed. `validate` proves a schedule keeps this contract.

Generation: 1F1B and interleaved 1F1B are closed-form orders (Narayanan et al. 2021). The zero-bubble schedules
(Qi et al. 2023) come from a list scheduler that plays the dependency graph in time with given costs: ZB-H1 keeps
1F1B's order of F and B and runs a W whenever the next of them cannot start; ZB-V runs F while memory allows,
else B, else W. Both hold at most 1F1B's peak of activations. Messages are then added to the compute orders.
"""
from __future__ import annotations

import heapq
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable, Literal

SCHEDULES = ("none", "1f1b", "interleaved", "zb-h1", "zb-v")

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


def build_schedule(name: str, pp: int, num_microbatches: int, num_chunks: int | None = None,
                   costs: Costs = Costs()) -> Schedule:
    """The action lists of schedule `name` for `pp` ranks and `num_microbatches` microbatches.

    `num_chunks` (model chunks per rank) defaults to the schedule's own: 1, or 2 for interleaved and zb-v; only
    interleaved accepts other values. The zero-bubble schedules are planned for `costs` (their order of F, B and
    W depends on them); 1F1B and interleaved have fixed orders. Raises ValueError for impossible combinations.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if pp < 1 or num_microbatches < 1:
        raise ValueError(f"pp ({pp}) and the number of microbatches ({num_microbatches}) must be at least 1")
    chunks = num_chunks if num_chunks is not None else (2 if name in ("interleaved", "zb-v") else 1)
    if name == "none" and pp != 1:
        raise ValueError(f"schedule 'none' runs without pipelining and needs pp=1 (got pp={pp}); use '1f1b'")
    if name == "interleaved":
        if chunks < 2 or pp < 2:
            raise ValueError(f"interleaved 1F1B needs pp >= 2 and at least 2 model chunks per rank (got pp={pp}, "
                             f"{chunks} chunks): set --num-layers-per-virtual-pipeline-stage below layers / pp")
        if num_microbatches % pp:
            raise ValueError(f"interleaved 1F1B needs the number of microbatches ({num_microbatches}) to be a "
                             f"multiple of pp ({pp})")
    elif chunks != (2 if name == "zb-v" else 1):
        raise ValueError(f"schedule {name!r} has {2 if name == 'zb-v' else 1} model chunk(s) per rank, "
                         f"got num_chunks={chunks}; only 'interleaved' takes virtual pipeline stages")
    shape = Schedule(name, pp, num_microbatches, chunks, name in ("zb-h1", "zb-v"), [], v_shape=name == "zb-v")
    if name in ("none", "1f1b"):
        orders = _one_f_one_b(pp, num_microbatches)
    elif name == "interleaved":
        orders = _interleaved(pp, num_microbatches, chunks)
    elif name == "zb-h1":
        orders = _list_schedule(shape, _zb_h1_policy(_one_f_one_b(pp, num_microbatches)), costs)
    else:
        orders = _list_schedule(shape, _zb_v_policy(shape), costs)
    return replace(shape, actions=_with_messages(shape, orders, costs))


def _input_stage(shape: Schedule, kind: str, stage: int) -> int | None:
    """The stage whose result `kind` on `stage` consumes: F the previous stage's activations, B the next stage's
    gradient; None for the first stage's F, the last stage's B (it starts from the loss) and W."""
    if kind == "F" and stage > 0:
        return stage - 1
    if kind == "B" and stage < shape.num_stages - 1:
        return stage + 1
    return None


def _output_stage(shape: Schedule, kind: str, stage: int) -> int | None:
    """The stage that consumes the result of `kind` on `stage` (F feeds the next stage, B the previous one)."""
    if kind == "F" and stage < shape.num_stages - 1:
        return stage + 1
    if kind == "B" and stage > 0:
        return stage - 1
    return None


def _peer(shape: Schedule, rank: int, stage: int | None) -> int | None:
    """The rank holding `stage` when a message to or from it is needed: None for no stage or a stage on `rank`."""
    if stage is None or shape.location(stage)[0] == rank:
        return None
    return shape.location(stage)[0]


# ---------------------------------------------------------------------------------------------------------------
# Compute orders: per rank, a list of (kind, chunk, microbatch) of F, B and W only.

Task = tuple[str, int, int]


def _one_f_one_b(pp: int, m: int) -> list[list[Task]]:
    """1F1B: rank r runs pp-1-r warm-up forwards, then alternates F and B, then drains the remaining B."""
    orders = []
    for r in range(pp):
        warmup = min(pp - 1 - r, m)
        order: list[Task] = [("F", 0, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [("F", 0, warmup + i), ("B", 0, i)]
        orders.append(order + [("B", 0, i) for i in range(m - warmup, m)])
    return orders


def _interleaved(pp: int, m: int, v: int) -> list[list[Task]]:
    """Interleaved 1F1B: microbatches go in groups of pp, each group through chunk 0, 1, ..., v-1 (backward:
    v-1, ..., 0); rank r warms up with 2(pp-1-r) + (v-1)pp forwards, then alternates F and B."""
    def forward(k: int) -> tuple[int, int]:
        group, rest = divmod(k, pp * v)
        return rest // pp, group * pp + rest % pp

    total = m * v
    orders = []
    for r in range(pp):
        warmup = min(2 * (pp - 1 - r) + (v - 1) * pp, total)
        order: list[Task] = [("F", *forward(k)) for k in range(warmup)]
        for k in range(total):
            if warmup + k < total:
                order.append(("F", *forward(warmup + k)))
            chunk, mb = forward(k)
            order.append(("B", v - 1 - chunk, mb))
        orders.append(order)
    return orders


# A policy picks, for a free rank at one moment, one of the ready tasks or None (wait). It sees the counters
# started[kind][stage]: how many microbatches of that kind have started on that stage (always in microbatch order).
Policy = Callable[[int, list[Task], dict[str, list[int]]], "Task | None"]


def _list_schedule(shape: Schedule, policy: Policy, costs: Costs) -> list[list[Task]]:
    """Play the dependency graph in time with `costs` and record, per rank, the order in which `policy` started
    the tasks. A free rank offers the policy the tasks whose inputs have arrived; each stage runs each kind in
    microbatch order."""
    stages, m = shape.num_stages, shape.num_microbatches
    started: dict[str, list[int]] = {k: [0] * stages for k in COMPUTE_KINDS}
    finish: dict[tuple[str, int, int], float] = {}
    orders: list[list[Task]] = [[] for _ in range(shape.pp)]
    free = [0.0] * shape.pp
    events: list[float] = []
    never = float("inf")

    def arrived(kind: str, stage: int, i: int, at: int, t: float) -> bool:
        """Whether the result of `kind` on `stage` for microbatch i can be used on stage `at` at time t."""
        latency = costs.comm if shape.location(stage)[0] != shape.location(at)[0] else 0.0
        return finish.get((kind, stage, i), never) + latency <= t

    t = 0.0
    while True:
        for r in range(shape.pp):
            while free[r] <= t:
                ready = []
                for c in range(shape.num_chunks):
                    s = shape.stage(r, c)
                    i = started["F"][s]
                    if i < m and (s == 0 or arrived("F", s - 1, i, s, t)):
                        ready.append(("F", c, i))
                    i = started["B"][s]
                    if arrived("F", s, i, s, t) and (s == stages - 1 or arrived("B", s + 1, i, s, t)):
                        ready.append(("B", c, i))
                    if arrived("B", s, started["W"][s], s, t):
                        ready.append(("W", c, started["W"][s]))
                task = policy(r, ready, started)
                if task is None:
                    break
                kind, c, i = task
                free[r] = finish[(kind, shape.stage(r, c), i)] = t + costs.duration(shape, kind)
                started[kind][shape.stage(r, c)] += 1
                orders[r].append(task)
                heapq.heappush(events, free[r])
                heapq.heappush(events, free[r] + costs.comm)
        if sum(map(len, orders)) == 3 * stages * m:
            return orders
        while events and events[0] <= t:
            heapq.heappop(events)
        if not events:
            raise RuntimeError(f"list scheduler for {shape.name} stalled at time {t}")
        t = heapq.heappop(events)


def _zb_h1_policy(one_f_one_b: list[list[Task]]) -> Policy:
    """ZB-H1: the F and B of 1F1B in 1F1B's order, and a W whenever the next of them is not ready or would hold
    more than pp microbatches (1F1B's peak, counted from F until W); the remaining W at the end."""
    pp = len(one_f_one_b)

    def policy(rank: int, ready: list[Task], started: dict[str, list[int]]) -> Task | None:
        order = one_f_one_b[rank]
        done = started["F"][rank] + started["B"][rank]
        if done < len(order) and order[done] in ready and \
                (order[done][0] == "B" or started["F"][rank] - started["W"][rank] < pp):
            return order[done]
        return next((task for task in ready if task[0] == "W"), None)
    return policy


def _zb_v_policy(shape: Schedule) -> Policy:
    """ZB-V: F while memory allows, else B, else W; for F and B the chunk on the later leg of the V first (a chunk-1
    forward heads for the loss, a chunk-0 backward completes its microbatch).

    Memory is counted from F until W and limited to 1F1B's peak: pp microbatches of a full stage, 2*pp chunk
    activations. Chunk 0 of rank r may hold at most 2*pp - 1 - r of them (what it holds, with unit costs, when its
    first gradient arrives); the rest is kept for the chunk-1 forwards coming back up the V, so a rank never fills
    up with chunk-0 activations while the chunk-1 forward that would free them is on its way.
    """
    limit = 2 * shape.pp

    def policy(rank: int, ready: list[Task], started: dict[str, list[int]]) -> Task | None:
        s0, s1 = shape.stage(rank, 0), shape.stage(rank, 1)
        held0 = started["F"][s0] - started["W"][s0]
        held = held0 + started["F"][s1] - started["W"][s1]
        by_kind = {(kind, c): (kind, c, i) for kind, c, i in ready}
        if ("F", 1) in by_kind and held < limit:
            return by_kind[("F", 1)]
        if ("F", 0) in by_kind and held < limit and held0 < limit - 1 - rank:
            return by_kind[("F", 0)]
        for key in (("B", 0), ("B", 1)):
            if key in by_kind:
                return by_kind[key]
        weight = [by_kind[key] for key in (("W", 0), ("W", 1)) if key in by_kind]
        return min(weight, key=lambda task: task[2]) if weight else None
    return policy


def _reference_starts(shape: Schedule, orders: list[list[Task]], costs: Costs) -> list[list[float]]:
    """Start time of every task when each rank runs its order as early as its inputs allow."""
    finish: dict[tuple[str, int, int], float] = {}
    starts: list[list[float]] = [[] for _ in orders]
    clock = [0.0] * len(orders)
    moved = True
    while moved:
        moved = False
        for r, order in enumerate(orders):
            while len(starts[r]) < len(order):
                kind, c, i = order[len(starts[r])]
                stage = shape.stage(r, c)
                source = _input_stage(shape, kind, stage)
                if source is not None and (kind, source, i) not in finish:
                    break
                start = clock[r]
                if source is not None:
                    latency = costs.comm if _peer(shape, r, source) is not None else 0.0
                    start = max(start, finish[(kind, source, i)] + latency)
                clock[r] = finish[(kind, stage, i)] = start + costs.duration(shape, kind)
                starts[r].append(start)
                moved = True
    if any(len(st) < len(order) for st, order in zip(starts, orders)):
        raise RuntimeError(f"{shape.name}: compute orders wait on each other")
    return starts


def _with_messages(shape: Schedule, orders: list[list[Task]], costs: Costs) -> list[list[Action]]:
    """Add the sends and receives to per-rank compute orders.

    A send follows the task that produced its data. The receive is posted where the data is sent in a reference
    run of the orders with `costs`: before the receiver's first task that starts no earlier than
    the send, which is never later than the task that needs it. So each batch of messages meets its peers' batches
    at the same moment of the reference run, and the lists cannot deadlock even if every batch waits for its sends
    as well as its receives; messages between two ranks are received in the order they were sent.
    """
    starts = _reference_starts(shape, orders, costs)
    inbox: list[list[tuple[float, int, Action]]] = [[] for _ in orders]  # per receiver: (time sent, sender, receive)
    for r, order in enumerate(orders):
        for (kind, c, i), start in zip(order, starts[r]):
            target = _output_stage(shape, kind, shape.stage(r, c))
            dst = _peer(shape, r, target)
            if dst is not None:
                receive = Action(f"RECV_{kind}", shape.location(target)[1], i, r)
                inbox[dst].append((start + costs.duration(shape, kind), r, receive))
    actions: list[list[Action]] = []
    for r, order in enumerate(orders):
        pending = sorted(inbox[r], key=lambda message: message[:2])
        out: list[Action] = []
        k = 0
        for (kind, c, i), start in zip(order, starts[r]):
            while k < len(pending) and pending[k][0] <= start:
                out.append(pending[k][2])
                k += 1
            out.append(Action(kind, c, i))
            dst = _peer(shape, r, _output_stage(shape, kind, shape.stage(r, c)))
            if dst is not None:
                out.append(Action(f"SEND_{kind}", c, i, dst))
        actions.append(out)
    return actions


# ---------------------------------------------------------------------------------------------------------------
# Checking and replaying action lists.

Interval = tuple[float, float, Action]
_Op = tuple[int, tuple[int, int, str], int]  # a posted message: (index in the list, (src, dst, SEND|RECV), k-th)


def execute(schedule: Schedule, duration: Callable[[Action], float], latency: float = 0.0,
            rendezvous: bool = False) -> list[list[Interval]]:
    """Replay the lists as the runtime executes them and return, per rank, (start, end, action) of F, B and W.

    Compute actions take `duration(action)`. A run of consecutive messages is posted as one batch; a receive
    completes `latency` after its send (the k-th from that peer) was posted, and the rank waits for its receives.
    Sends are waited for lazily, or, with `rendezvous`, the batch also waits until the peers posted the receives
    of its sends (NCCL group semantics). Raises ScheduleError if ranks block for ever.
    """
    posted: dict[tuple[int, int, str], list[float]] = defaultdict(list)  # (src, dst, SEND|RECV) -> times
    clock = [0.0] * schedule.pp
    done = [0] * schedule.pp
    batch: list[list[_Op]] = [[] for _ in range(schedule.pp)]  # per rank, the posted batch until it completes
    timeline: list[list[Interval]] = [[] for _ in range(schedule.pp)]
    moved = True
    while moved:
        moved = False
        for r, acts in enumerate(schedule.actions):
            while done[r] < len(acts):
                a = acts[done[r]]
                if not a.is_comm:
                    timeline[r].append((clock[r], clock[r] + duration(a), a))
                    clock[r] += duration(a)
                    done[r] += 1
                    moved = True
                    continue
                end = done[r]
                while end < len(acts) and acts[end].is_comm:
                    end += 1
                if not batch[r]:
                    for index in range(done[r], end):
                        verb = acts[index].kind[:4]
                        key = (r, acts[index].peer, verb) if verb == "SEND" else (acts[index].peer, r, verb)
                        batch[r].append((index, key, len(posted[key])))
                        posted[key].append(clock[r])
                        moved = True
                if any(k >= len(posted[_counterpart(key)]) for _, key, k in _waits(batch[r], rendezvous)):
                    break
                clock[r] = max([clock[r]] + [posted[_counterpart(key)][k] + latency
                                             for _, key, k in _waits(batch[r], rendezvous)])
                batch[r] = []
                done[r] = end
    stuck = [f"rank {r} at {acts[missing[0]]} (action {missing[0]})" for r, acts in enumerate(schedule.actions)
             if (missing := [index for index, key, k in _waits(batch[r], rendezvous)
                             if k >= len(posted[_counterpart(key)])])]
    if stuck:
        raise ScheduleError(f"{schedule.name}: deadlock{' (batches waiting for their sends)' if rendezvous else ''}"
                            f", blocked for ever: {', '.join(stuck)}")
    return timeline


def _waits(batch: list[_Op], rendezvous: bool) -> list[_Op]:
    """The posted operations a batch waits for: its receives, and with `rendezvous` its sends too."""
    return [op for op in batch if op[1][2] == "RECV" or rendezvous]


def _counterpart(key: tuple[int, int, str]) -> tuple[int, int, str]:
    """(src, dst, SEND) <-> (src, dst, RECV): where the matching operation is recorded."""
    src, dst, verb = key
    return src, dst, "RECV" if verb == "SEND" else "SEND"


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError, naming the rank and action, unless the lists keep the runtime contract.

    Checked: every (chunk, microbatch) has exactly one F, one B and, with split backward, one W (otherwise none),
    in the order F, B, W on its rank; each F and B comes after its input (a receive from the rank holding the
    neighbouring stage, or that stage's F or B when it is on the same rank); each send comes after the action
    that produced its data and goes to the rank of the consuming stage; in a run of consecutive messages the
    sends come first; the k-th send from a to b and the k-th receive on b from a carry the same data; and replaying
    the lists ends (no deadlock) both with lazily waited sends and with batches that wait for their sends.
    """
    if len(schedule.actions) != schedule.pp:
        raise ScheduleError(f"{schedule.name}: {len(schedule.actions)} action lists for pp={schedule.pp}")
    messages: dict[tuple[int, int, str], list[Action]] = defaultdict(list)  # (src, dst, SEND|RECV) -> in order
    for rank in range(schedule.pp):
        _check_rank(schedule, rank, messages)
    _check_pairs(schedule, messages)
    execute(schedule, lambda a: 1.0)
    execute(schedule, lambda a: 1.0, rendezvous=True)


def _check_rank(s: Schedule, r: int, messages: dict[tuple[int, int, str], list[Action]]) -> None:
    """The checks of `validate` on one rank's list; collects its messages by (src, dst, SEND|RECV)."""
    seen: set[tuple[str, int, int]] = set()
    acts = s.actions[r]
    for prev, a in zip([None, *acts], acts):
        here = f"{s.name}: rank {r}: {a}"
        if not (0 <= a.chunk < s.num_chunks and 0 <= a.microbatch < s.num_microbatches):
            raise ScheduleError(f"{here}: chunk or microbatch out of range")
        if (a.kind, a.chunk, a.microbatch) in seen:
            raise ScheduleError(f"{here}: appears twice")
        stage = s.stage(r, a.chunk)
        if a.is_comm:
            verb, data = a.kind.split("_")
            if verb == "SEND" and prev is not None and prev.kind.startswith("RECV"):
                raise ScheduleError(f"{here}: after {prev} in one run of messages; post the sends first")
            peer = _peer(s, r, (_output_stage if verb == "SEND" else _input_stage)(s, data, stage))
            if a.peer != peer:
                raise ScheduleError(f"{here}: no such message; stage {stage}'s {data} data goes "
                                    f"{'to' if verb == 'SEND' else 'from'} {'no other rank' if peer is None else peer}")
            if verb == "SEND" and (data, a.chunk, a.microbatch) not in seen:
                raise ScheduleError(f"{here}: sent before {data}{a.chunk}.{a.microbatch} computed it")
            messages[(r, a.peer, verb) if verb == "SEND" else (a.peer, r, verb)].append(a)
        else:
            if a.kind == "W" and not s.split_backward:
                raise ScheduleError(f"{here}: W in a schedule whose B computes the weight gradients too")
            before = {"B": "F", "W": "B"}.get(a.kind)
            if before and (before, a.chunk, a.microbatch) not in seen:
                raise ScheduleError(f"{here}: before {before}{a.chunk}.{a.microbatch}")
            source = _input_stage(s, a.kind, stage)
            if source is not None:
                peer = _peer(s, r, source)
                need = (a.kind, s.location(source)[1], a.microbatch) if peer is None else \
                    (f"RECV_{a.kind}", a.chunk, a.microbatch)
                if need not in seen:
                    raise ScheduleError(f"{here}: its input {Action(*need, peer)} does not come before it")
        seen.add((a.kind, a.chunk, a.microbatch))
    for kind in ("F", "B", "W") if s.split_backward else ("F", "B"):
        for c in range(s.num_chunks):
            for i in range(s.num_microbatches):
                if (kind, c, i) not in seen:
                    raise ScheduleError(f"{s.name}: rank {r} never runs {kind}{c}.{i}")


def _check_pairs(s: Schedule, messages: dict[tuple[int, int, str], list[Action]]) -> None:
    """The k-th send from src to dst and the k-th receive on dst from src carry the same data, none left over."""
    for src in range(s.pp):
        for dst in range(s.pp):
            sends, recvs = messages[(src, dst, "SEND")], messages[(src, dst, "RECV")]
            for k, (send, recv) in enumerate(zip(sends, recvs)):
                data = send.kind[-1]
                if (recv.kind[-1], recv.microbatch) != (data, send.microbatch) or \
                        s.stage(dst, recv.chunk) != _output_stage(s, data, s.stage(src, send.chunk)):
                    raise ScheduleError(f"{s.name}: message {k} from rank {src} to rank {dst}: sent as {send}, "
                                        f"received as {recv}; receives must follow the order of the sends")
            if len(sends) != len(recvs):
                raise ScheduleError(f"{s.name}: rank {src} sends {len(sends)} messages to rank {dst}, "
                                    f"which receives {len(recvs)}")


def peak_activations(schedule: Schedule, until: Literal["B", "W"] = "B") -> list[float]:
    """Per rank, the most activations held at once, in microbatches of a full stage (one chunk's weigh
    1/num_chunks). Held from F until B, or with `until="W"` until W: after B the weight-gradient pass still
    keeps the inputs of the linear layers, so this bounds split backward's memory from above."""
    release = until if schedule.split_backward else "B"
    peaks = []
    for acts in schedule.actions:
        level = peak = 0
        for a in acts:
            level += (a.kind == "F") - (a.kind == release)
            peak = max(peak, level)
        peaks.append(peak / schedule.num_chunks)
    return peaks
