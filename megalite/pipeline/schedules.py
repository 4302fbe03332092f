"""The public builder of pipeline schedules: `build_schedule(name, ...)` for one of `SCHEDULES`.

The result is a `megalite.pipeline.actions.Schedule`, per rank the ordered list of actions the runtime executes;
`megalite.pipeline.orders` generates the compute orders and inserts the messages, `megalite.pipeline.validate`
checks and replays the lists.
"""
from __future__ import annotations

from dataclasses import replace

from megalite.pipeline.actions import Costs, Schedule
from megalite.pipeline.orders import (
    forward_order, interleaved, list_schedule, one_f_one_b, with_messages, zb_h1_policy, zb_v_policy,
)

SCHEDULES = ("none", "1f1b", "interleaved", "zb-h1", "zb-v")


def build_schedule(name: str, pp: int, num_microbatches: int, num_chunks: int | None = None,
                   costs: Costs = Costs(), forward_only: bool = False) -> Schedule:
    """The action lists of schedule `name` for `pp` ranks and `num_microbatches` microbatches.

    `num_chunks` (model chunks per rank) defaults to the schedule's own: 1, or 2 for interleaved and zb-v; only
    interleaved accepts other values. The zero-bubble schedules are planned for `costs` (their order of F, B and
    W depends on them); 1F1B and interleaved have fixed orders. With `forward_only` the lists hold only the F and
    their activation messages, on the stages of schedule `name`, each F as early as a pipelined run allows.
    Raises ValueError for impossible combinations.
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
    split = name in ("zb-h1", "zb-v") and not forward_only
    shape = Schedule(name, pp, num_microbatches, chunks, split, [], v_shape=name == "zb-v", forward_only=forward_only)
    if forward_only:
        orders = forward_order(shape)
    elif name in ("none", "1f1b"):
        orders = one_f_one_b(pp, num_microbatches)
    elif name == "interleaved":
        orders = interleaved(pp, num_microbatches, chunks)
    elif name == "zb-h1":
        orders = list_schedule(shape, zb_h1_policy(one_f_one_b(pp, num_microbatches)), costs)
    else:
        orders = list_schedule(shape, zb_v_policy(shape), costs)
    return replace(shape, actions=with_messages(shape, orders, costs))
