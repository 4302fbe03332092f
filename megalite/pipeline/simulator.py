"""`megalite plan pipeline`: simulate pipeline schedules from the same action lists the runtime executes.

Prints, for the schedules side by side, the bubble fraction (mean over ranks and per rank), the makespan and the
peak activation memory per rank, and writes a timeline picture (PNG, one row per rank).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from megalite.parser import Parser
from megalite.pipeline.actions import Costs, Schedule
from megalite.pipeline.png import timeline_png
from megalite.pipeline.schedules import SCHEDULES, build_schedule
from megalite.pipeline.validate import Interval, execute, peak_activations, validate


@dataclass
class Simulation:
    """One schedule replayed with given costs: per-rank timeline, busy time, bubble and peak memory."""

    schedule: Schedule
    timeline: list[list[Interval]]
    """Per rank, (start, end, action) of every F, B and W."""
    busy: list[float]
    makespan: float
    peak_activations: list[float]
    """Per rank, activations held from F to B, in microbatches of a full stage."""
    peak_until_w: list[float]
    """The same, held until W (the inputs kept for the weight gradients); equal to the above without split."""

    @property
    def bubble(self) -> list[float]:
        """Per rank, 1 - busy / makespan: the fraction of the step the rank is idle."""
        return [1 - b / self.makespan for b in self.busy]

    @property
    def mean_bubble(self) -> float:
        return sum(self.bubble) / len(self.bubble)


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Simulation:
    """Replay `schedule` with `costs`: sends never block, a receive waits for its send plus `costs.comm`."""
    timeline = execute(schedule, lambda a: costs.duration(schedule, a.kind), costs.comm)
    busy = [sum(end - start for start, end, _ in row) for row in timeline]
    makespan = max(row[-1][1] for row in timeline)
    return Simulation(schedule, timeline, busy, makespan, peak_activations(schedule),
                      peak_activations(schedule, until="W"))


def format_table(simulations: list[Simulation]) -> str:
    """The schedules side by side: bubble (mean, per rank), makespan, peak activations per rank."""
    def numbers(values: list[float], fmt: str) -> str:
        return " ".join(format(v, fmt) for v in values)

    rows = [("schedule", "bubble", "makespan", "bubble per rank", "peak act. F->B", "peak act. F->W")]
    for sim in simulations:
        s = sim.schedule
        name = f"{s.name} v={s.num_chunks}" if s.name == "interleaved" else s.name
        rows.append((name, f"{sim.mean_bubble:.3f}", f"{sim.makespan:g}", numbers(sim.bubble, ".3f"),
                     numbers(sim.peak_activations, "g"), numbers(sim.peak_until_w, "g")))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="megalite plan pipeline",
        description="Simulate pipeline schedules from their action lists: bubble fraction (1 - busy/makespan) and "
                    "peak activations (in microbatches of a full stage) per rank, and a timeline picture.")
    parser.add_argument("--pp", type=int, default=4, help="pipeline-parallel size (ranks)")
    parser.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    parser.add_argument("--schedule", choices=(*SCHEDULES, "all"), default="all", help="schedule, or all of them")
    parser.add_argument("--chunks", type=int, default=2, help="model chunks per rank of the interleaved schedule")
    parser.add_argument("--f", type=float, default=1.0, help="forward time of one microbatch through one stage")
    parser.add_argument("--b", type=float, default=1.0, help="backward time to the input gradients")
    parser.add_argument("--w", type=float, default=1.0, help="backward time to the weight gradients")
    parser.add_argument("--comm", type=float, default=0.0, help="time of one message between stages")
    parser.add_argument("--png", default=None,
                        help="timeline picture of the chosen schedule (zb-v for all); default pipeline_NAME.png, "
                             "'' for none")
    parser.add_argument("--print-actions", action="store_true", help="print every rank's action list")
    args = parser.parse_args(argv)
    if args.pp < 1 or args.microbatches < 1:
        parser.error("--pp and --microbatches must be at least 1")
    try:
        costs = Costs(args.f, args.b, args.w, args.comm)
    except ValueError as error:
        parser.error(f"--f, --b, --w, --comm: {error}")
    names = SCHEDULES if args.schedule == "all" else (args.schedule,)
    simulations, skipped = [], []
    for name in names:
        try:
            schedule = build_schedule(name, args.pp, args.microbatches,
                                      args.chunks if name == "interleaved" else None, costs)
        except ValueError as error:
            if args.schedule != "all":
                parser.error(str(error))
            skipped.append(f"{name} ({error})")
            continue
        validate(schedule)
        simulations.append(simulate(schedule, costs))
    print(f"pp={args.pp}, {args.microbatches} microbatches, f={args.f:g} b={args.b:g} w={args.w:g} "
          f"comm={args.comm:g}")
    print(format_table(simulations))
    for line in skipped:
        print(f"skipped: {line}")
    if args.print_actions:
        for sim in simulations:
            print(f"\n{sim.schedule.name}:\n{sim.schedule}")
    pictured = next(sim for sim in simulations if sim.schedule.name == names[-1])
    path = f"pipeline_{pictured.schedule.name}.png" if args.png is None else args.png
    if path:
        Path(path).write_bytes(timeline_png(pictured.timeline, pictured.makespan, pictured.schedule.num_chunks))
        print(f"timeline of {pictured.schedule.name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
