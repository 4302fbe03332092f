"""How pipeline schedules are generated: per rank a compute order of F, B and W, then the messages inserted.

1F1B and interleaved 1F1B are closed-form orders (Narayanan et al. 2021). The zero-bubble schedules (Qi et al.
2023) come from a list scheduler that plays the dependency graph in time with given costs: ZB-H1 keeps 1F1B's
order of F and B and runs a W whenever the next of them cannot start; ZB-V runs F while memory allows, else B,
else W. Both hold at most 1F1B's peak of activations. A forward-only order runs each F as early as a pipelined run
allows. `with_messages` then adds the sends and receives to the compute orders.
"""
from __future__ import annotations

import heapq
from typing import Callable

from megalite.pipeline.actions import COMPUTE_KINDS, Action, Costs, Schedule


def input_stage(shape: Schedule, kind: str, stage: int) -> int | None:
    """The stage whose result `kind` on `stage` consumes: F the previous stage's activations, B the next stage's
    gradient; None for the first stage's F, the last stage's B (it starts from the loss) and W."""
    if kind == "F" and stage > 0:
        return stage - 1
    if kind == "B" and stage < shape.num_stages - 1:
        return stage + 1
    return None


def output_stage(shape: Schedule, kind: str, stage: int) -> int | None:
    """The stage that consumes the result of `kind` on `stage` (F feeds the next stage, B the previous one)."""
    if kind == "F" and stage < shape.num_stages - 1:
        return stage + 1
    if kind == "B" and stage > 0:
        return stage - 1
    return None


def peer(shape: Schedule, rank: int, stage: int | None) -> int | None:
    """The rank holding `stage` when a message to or from it is needed: None for no stage or a stage on `rank`."""
    if stage is None or shape.location(stage)[0] == rank:
        return None
    return shape.location(stage)[0]


Task = tuple[str, int, int]
"""(kind, chunk, microbatch) of an F, B or W: one entry of a rank's compute order."""


def one_f_one_b(pp: int, m: int) -> list[list[Task]]:
    """1F1B: rank r runs pp-1-r warm-up forwards, then alternates F and B, then drains the remaining B."""
    orders = []
    for r in range(pp):
        warmup = min(pp - 1 - r, m)
        order: list[Task] = [("F", 0, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [("F", 0, warmup + i), ("B", 0, i)]
        orders.append(order + [("B", 0, i) for i in range(m - warmup, m)])
    return orders


def interleaved(pp: int, m: int, v: int) -> list[list[Task]]:
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


def forward_order(shape: Schedule) -> list[list[Task]]:
    """Forward only: rank r runs F of chunk c, microbatch i at step i + stage(r, c), as early as a pipelined run
    allows (each F one step after its input's); on a tie the later stage first."""
    def order(rank: int) -> list[Task]:
        steps = sorted((i + shape.stage(rank, c), -shape.stage(rank, c), c, i)
                       for c in range(shape.num_chunks) for i in range(shape.num_microbatches))
        return [("F", c, i) for _, _, c, i in steps]
    return [order(r) for r in range(shape.pp)]


# A policy picks, for a free rank at one moment, one of the ready tasks or None (wait). It sees the counters
# started[kind][stage]: how many microbatches of that kind have started on that stage (always in microbatch order).
Policy = Callable[[int, list[Task], dict[str, list[int]]], "Task | None"]


def list_schedule(shape: Schedule, policy: Policy, costs: Costs) -> list[list[Task]]:
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


def zb_h1_policy(orders: list[list[Task]]) -> Policy:
    """ZB-H1: the F and B of the 1F1B `orders` in their order, and a W whenever the next of them is not ready or
    would hold more than pp microbatches (1F1B's peak, counted from F until W); the remaining W at the end."""
    pp = len(orders)

    def policy(rank: int, ready: list[Task], started: dict[str, list[int]]) -> Task | None:
        order = orders[rank]
        done = started["F"][rank] + started["B"][rank]
        if done < len(order) and order[done] in ready and \
                (order[done][0] == "B" or started["F"][rank] - started["W"][rank] < pp):
            return order[done]
        return next((task for task in ready if task[0] == "W"), None)
    return policy


def zb_v_policy(shape: Schedule) -> Policy:
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
                source = input_stage(shape, kind, stage)
                if source is not None and (kind, source, i) not in finish:
                    break
                start = clock[r]
                if source is not None:
                    latency = costs.comm if peer(shape, r, source) is not None else 0.0
                    start = max(start, finish[(kind, source, i)] + latency)
                clock[r] = finish[(kind, stage, i)] = start + costs.duration(shape, kind)
                starts[r].append(start)
                moved = True
    if any(len(st) < len(order) for st, order in zip(starts, orders)):
        raise RuntimeError(f"{shape.name}: compute orders wait on each other")
    return starts


def with_messages(shape: Schedule, orders: list[list[Task]], costs: Costs) -> list[list[Action]]:
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
            target = output_stage(shape, kind, shape.stage(r, c))
            dst = peer(shape, r, target)
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
            dst = peer(shape, r, output_stage(shape, kind, shape.stage(r, c)))
            if dst is not None:
                out.append(Action(f"SEND_{kind}", c, i, dst))
        actions.append(out)
    return actions
