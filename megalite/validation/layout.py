"""Rules on the parallel layout: the sizes, the world they divide, the rank order, pipeline stages and
schedules, and the sequence splits of context and sequence parallelism."""
from __future__ import annotations

from megalite.config import MegaliteConfig
from megalite.validation.core import Defaults


def _sizes(c: MegaliteConfig, d: Defaults) -> dict[str, int]:
    p = c.parallel
    return {
        "--tensor-model-parallel-size": p.tensor_model_parallel_size,
        "--context-parallel-size": p.context_parallel_size,
        "--pipeline-model-parallel-size": p.pipeline_model_parallel_size,
        "--expert-model-parallel-size": p.expert_model_parallel_size,
        "--expert-tensor-parallel-size": d.expert_tensor_parallel_size,
    }


def positive_parallel_sizes(c: MegaliteConfig, d: Defaults) -> str | None:
    bad = [f"{k} {v}" for k, v in _sizes(c, d).items() if v < 1]
    return f"{', '.join(bad)}: parallel sizes must be at least 1." if bad else None


def world_divides_dense_grid(c: MegaliteConfig, d: Defaults) -> str | None:
    p, world = c.parallel, d.world_size
    if min(_sizes(c, d).values()) < 1:
        return None
    grid = p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
    if world % grid:
        return (
            f"world size {world} is not divisible by --tensor-model-parallel-size {p.tensor_model_parallel_size} x "
            f"--context-parallel-size {p.context_parallel_size} x --pipeline-model-parallel-size "
            f"{p.pipeline_model_parallel_size} = {grid}; change the sizes or the number of processes."
        )
    return None


def world_divides_expert_grid(c: MegaliteConfig, d: Defaults) -> str | None:
    p, world, etp = c.parallel, d.world_size, d.expert_tensor_parallel_size
    if min(_sizes(c, d).values()) < 1:
        return None
    grid = etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size
    if world % grid:
        return (
            f"world size {world} is not divisible by --expert-tensor-parallel-size {etp} x "
            f"--expert-model-parallel-size {p.expert_model_parallel_size} x --pipeline-model-parallel-size "
            f"{p.pipeline_model_parallel_size} = {grid}; change the expert sizes or the number of processes."
        )
    return None


def rank_order_is_a_permutation(c: MegaliteConfig, d: Defaults) -> str | None:
    from megalite.parallel_state import parse_order

    try:
        parse_order(c.parallel.rank_order)
    except ValueError as e:
        return f"--rank-order {c.parallel.rank_order!r}: {e}"
    return None


def layers_divisible_by_pp(c: MegaliteConfig, d: Defaults) -> str | None:
    layers, pp = c.model.num_layers, c.parallel.pipeline_model_parallel_size
    if layers < 1:
        return f"--num-layers {layers} must be at least 1."
    if pp >= 1 and layers % pp:
        return (
            f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp}; "
            "every stage holds the same number of layers."
        )
    return None


def interleaving_flags_agree(c: MegaliteConfig, d: Defaults) -> str | None:
    p = c.parallel
    per_stage = p.num_layers_per_virtual_pipeline_stage
    if p.pipeline_schedule == "interleaved" and per_stage is None:
        return "--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage."
    if per_stage is not None and p.pipeline_schedule != "interleaved":
        return (
            f"--num-layers-per-virtual-pipeline-stage is set but --pipeline-schedule is {p.pipeline_schedule}; "
            "add --pipeline-schedule interleaved or drop the flag."
        )
    return None


def interleaving_needs_pipeline(c: MegaliteConfig, d: Defaults) -> str | None:
    p = c.parallel
    if p.pipeline_schedule in ("interleaved", "zb-v") and p.pipeline_model_parallel_size < 2:
        return f"--pipeline-schedule {p.pipeline_schedule} needs --pipeline-model-parallel-size of at least 2."
    return None


def virtual_stages_divide_layers(c: MegaliteConfig, d: Defaults) -> str | None:
    p, layers = c.parallel, c.model.num_layers
    per_stage = p.num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return None
    pp = max(1, p.pipeline_model_parallel_size)
    if per_stage < 1 or layers % (pp * per_stage):
        return (
            f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp} x "
            f"--num-layers-per-virtual-pipeline-stage {per_stage}."
        )
    if layers // (pp * per_stage) < 2:
        return (
            f"--num-layers-per-virtual-pipeline-stage {per_stage} gives one chunk per stage; "
            "lower it for interleaving, or use --pipeline-schedule 1f1b."
        )
    return None


def zero_bubble_v_needs_two_chunks(c: MegaliteConfig, d: Defaults) -> str | None:
    p, layers = c.parallel, c.model.num_layers
    pp = max(1, p.pipeline_model_parallel_size)
    if p.pipeline_schedule == "zb-v" and layers % (2 * pp):
        return (
            f"--pipeline-schedule zb-v puts two chunks on each stage: --num-layers {layers} must be divisible by "
            f"2 x --pipeline-model-parallel-size {pp}."
        )
    return None


def sequence_divisible_for_cp(c: MegaliteConfig, d: Defaults) -> str | None:
    cp, s = c.parallel.context_parallel_size, c.model.seq_length
    if cp > 1 and s % (2 * cp):
        return (
            f"--seq-length {s} is not divisible by 2 x --context-parallel-size {cp}; "
            "context parallelism cuts the sequence into 2 x CP chunks."
        )
    return None


def sequence_divisible_for_sp(c: MegaliteConfig, d: Defaults) -> str | None:
    p, s = c.parallel, c.model.seq_length
    cp, tp = max(1, p.context_parallel_size), max(1, p.tensor_model_parallel_size)
    if p.sequence_parallel and s % (cp * tp):
        return (
            f"--seq-length {s} is not divisible by --context-parallel-size {cp} x --tensor-model-parallel-size "
            f"{tp}; sequence parallelism splits each context-parallel shard over the TP ranks."
        )
    return None
