"""`megalite plan memory [TRAIN FLAGS] --world-size N`: the per-rank memory estimate of a run, without running it.

Takes the flags of `megalite train`. For one rank of every pipeline stage, it joins torch's fake process group as
that rank of a world of N, builds the rank's groups and model chunks on the meta device (no memory, no
communication) and prints the estimate `megalite train` prints at start-up (`megalite.memory`), so a layout can
be checked against the GPUs before they are booked.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import build_parser, config_from_namespace, resolve
from megalite.config import MegaliteConfig
from megalite.memory import GIB, MemoryEstimate


def stage_estimates(config: MegaliteConfig, world_size: int, device_type: str = "cuda"
                    ) -> list[tuple[int, MemoryEstimate]]:
    """(rank, estimate) for the first rank of every pipeline stage of `config` on `world_size` ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megalite.context import ModelContext
    from megalite.data.tokenizers import build_tokenizer
    from megalite.engine.setup import (
        build_chunks,
        build_schedule_for,
        dtype_of,
        knobs_of,
        rank_memory_estimate,
        with_vocab_size,
    )

    if dist.is_initialized():
        raise RuntimeError("plan memory needs a process without torch.distributed initialised")
    config, derived = resolve(config, world_size)
    if config.model.vocab_size is None:
        config = with_vocab_size(config, build_tokenizer(config.data).vocab_size)
    p = config.parallel
    layout = ps.generate_rank_groups(world_size, tp=p.tensor_model_parallel_size, cp=p.context_parallel_size,
                                     pp=p.pipeline_model_parallel_size, ep=p.expert_model_parallel_size,
                                     etp=p.expert_tensor_parallel_size, order=p.rank_order)
    dtype = dtype_of(config)
    schedule = build_schedule_for(config, derived, derived.num_microbatches)
    out = []
    for rank in layout["pp"][0]:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            groups = ps.initialize_model_parallel(
                tp=p.tensor_model_parallel_size, cp=p.context_parallel_size, pp=p.pipeline_model_parallel_size,
                ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size, order=p.rank_order)
            chunks = build_chunks(config, groups, ModelContext(knobs_of(config)), schedule, torch.device("meta"), dtype)
            out.append((rank, rank_memory_estimate(config, derived, chunks, schedule, groups, device_type)))
            ps.destroy_model_parallel(groups)
        finally:
            dist.destroy_process_group()
    return out


def format_table(estimates: list[tuple[int, MemoryEstimate]]) -> str:
    rows = ["| pipeline stage (rank) | weights GiB | fp32 grads GiB | optimizer GiB | activations GiB | total GiB |",
            "|---|---:|---:|---:|---:|---:|"]
    for stage, (rank, e) in enumerate(estimates):
        cells = [e.params, e.grads, e.optimizer, e.activations, e.total]
        rows.append(f"| {stage} ({rank}) | " + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = build_parser()
    parser.prog = "megalite plan memory"
    extra = parser.add_argument_group("plan")
    extra.add_argument("--world-size", type=int, required=True, help="Number of ranks (GPUs) of the run.")
    extra.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="Device whose kernels set the widths of dropout masks and norm statistics.")
    args = parser.parse_args(argv)
    plan = {k: vars(args).pop(k) for k in ("world_size", "device")}
    estimates = stage_estimates(config_from_namespace(argparse.Namespace(**vars(args))), plan["world_size"],
                                plan["device"])
    print(f"memory estimate per rank ({plan['world_size']} ranks, {plan['device']} kernels), one rank per "
          "pipeline stage:")
    print(format_table(estimates))
    worst = max(estimates, key=lambda re: re[1].total)
    print(f"most: {worst[1].total / GIB:.2f} GiB on rank {worst[0]}")
    return 0

