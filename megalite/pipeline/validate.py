"""Checking and replaying pipeline schedules: `validate` proves that action lists keep the runtime contract (see
`megalite.pipeline.actions`), `execute` replays them in time, `peak_activations` counts the memory they hold.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Literal

from megalite.pipeline.actions import Action, Schedule, ScheduleError
from megalite.pipeline.orders import input_stage, output_stage, peer

Interval = tuple[float, float, Action]
"""(start, end, action) of one F, B or W in a replay."""
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
    in the order F, B, W on its rank (forward only: exactly one F, and no B, W or gradient message); each F and B
    comes after its input (a receive from the rank holding the neighbouring stage, or that stage's F or B when it
    is on the same rank); each send comes after the action that produced its data and goes to the rank of the
    consuming stage; in a run of consecutive messages the sends come first; the k-th send from a to b and the k-th
    receive on b from a carry the same data; and replaying the lists ends (no deadlock) both with lazily waited
    sends and with batches that wait for their sends.
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
        if s.forward_only and a.kind[-1] != "F":
            raise ScheduleError(f"{here}: backward in a forward-only schedule")
        stage = s.stage(r, a.chunk)
        if a.is_comm:
            verb, data = a.kind.split("_")
            if verb == "SEND" and prev is not None and prev.kind.startswith("RECV"):
                raise ScheduleError(f"{here}: after {prev} in one run of messages; post the sends first")
            other = peer(s, r, (output_stage if verb == "SEND" else input_stage)(s, data, stage))
            if a.peer != other:
                raise ScheduleError(f"{here}: no such message; stage {stage}'s {data} data goes "
                                    f"{'to' if verb == 'SEND' else 'from'} "
                                    f"{'no other rank' if other is None else other}")
            if verb == "SEND" and (data, a.chunk, a.microbatch) not in seen:
                raise ScheduleError(f"{here}: sent before {data}{a.chunk}.{a.microbatch} computed it")
            messages[(r, a.peer, verb) if verb == "SEND" else (a.peer, r, verb)].append(a)
        else:
            if a.kind == "W" and not s.split_backward:
                raise ScheduleError(f"{here}: W in a schedule whose B computes the weight gradients too")
            before = {"B": "F", "W": "B"}.get(a.kind)
            if before and (before, a.chunk, a.microbatch) not in seen:
                raise ScheduleError(f"{here}: before {before}{a.chunk}.{a.microbatch}")
            source = input_stage(s, a.kind, stage)
            if source is not None:
                other = peer(s, r, source)
                need = (a.kind, s.location(source)[1], a.microbatch) if other is None else \
                    (f"RECV_{a.kind}", a.chunk, a.microbatch)
                if need not in seen:
                    raise ScheduleError(f"{here}: its input {Action(*need, other)} does not come before it")
        seen.add((a.kind, a.chunk, a.microbatch))
    for kind in ("F",) if s.forward_only else ("F", "B", "W") if s.split_backward else ("F", "B"):
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
                        s.stage(dst, recv.chunk) != output_stage(s, data, s.stage(src, send.chunk)):
                    raise ScheduleError(f"{s.name}: message {k} from rank {src} to rank {dst}: sent as {send}, "
                                        f"received as {recv}; receives must follow the order of the sends")
            if len(sends) != len(recvs):
                raise ScheduleError(f"{s.name}: rank {src} sends {len(sends)} messages to rank {dst}, "
                                    f"which receives {len(recvs)}")


def peak_activations(schedule: Schedule, until: Literal["B", "W"] = "B") -> list[float]:
    """Per rank, the most activations held at once, in microbatches of a full stage (one chunk's weigh
    1/num_chunks). Held from F until B, or with `until="W"` until W: after B the weight-gradient pass still
    keeps the inputs of the linear layers, so this bounds split backward's memory from above. A forward-only
    schedule holds nothing for a backward (an F's activations are freed once its output is sent): 0 per rank."""
    if schedule.forward_only:
        return [0.0] * schedule.pp
    release = until if schedule.split_backward else "B"
    peaks = []
    for acts in schedule.actions:
        level = peak = 0
        for a in acts:
            level += (a.kind == "F") - (a.kind == release)
            peak = max(peak, level)
        peaks.append(peak / schedule.num_chunks)
    return peaks
