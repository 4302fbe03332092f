"""`megalite plan rl [TRAIN FLAGS] [RL FLAGS] --world-size N`: an RL job's derived step counts and its per-rank memory,
without starting a process.

Memory per rank (one rank per pipeline stage): the policy's weights, fp32 gradients, optimizer state and training
activations (as `megalite plan memory` computes them), the frozen reference model's weights (same layout and dtype;
none when --grpo-kl-loss-beta is 0), and the KV cache of one rollout micro batch: --ppo-rollout-micro-batch-size x
--ppo-sampling-repeat sequences of --seq-length tokens, 2 x this rank's layers x its K/V heads (/ TP) x head dim x
element size bytes per token.
"""
from __future__ import annotations

import argparse

import torch

from megalite.arguments import add_config_group, build_parser, config_from_namespace, section_from_namespace
from megalite.config import MegaliteConfig
from megalite.memory import GIB
from megalite.rl.config import RLConfig
from megalite.rl.plan import RLPlan, count_prompts, plan_rl


def build_rl_parser(prog: str) -> argparse.ArgumentParser:
    """`megalite train`'s flags plus the RL flags."""
    parser = build_parser(prog)
    add_config_group(parser, "rl", RLConfig)
    return parser


def kv_cache_bytes(config: MegaliteConfig, rl: RLConfig) -> int:
    """Bytes of one rollout micro batch's KV cache on one rank (see the module docstring)."""
    m, p = config.model, config.parallel
    element = torch.tensor([], dtype=torch.bfloat16 if config.training.bf16 else torch.float16
                           if config.training.fp16 else torch.float32).element_size()
    kv_heads = (m.num_query_groups or m.num_attention_heads) // p.tensor_model_parallel_size
    per_token = 2 * (m.num_layers // p.pipeline_model_parallel_size) * kv_heads * m.head_size * element
    return rl.ppo_rollout_micro_batch_size * rl.ppo_sampling_repeat * m.seq_length * per_token


def memory_table(config: MegaliteConfig, rl: RLConfig, world_size: int, device: str) -> tuple[str, float]:
    """The per-rank memory table and the largest total in bytes."""
    from megalite.plan_memory import stage_estimates

    kv = kv_cache_bytes(config, rl)
    rows = ["| pipeline stage (rank) | weights GiB | fp32 grads GiB | optimizer GiB | activations GiB | reference GiB "
            "| KV cache GiB | total GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    most = 0.0
    for stage, (rank, e) in enumerate(stage_estimates(config, world_size, device)):
        reference = e.params if rl.grpo_kl_loss_beta > 0 else 0.0
        total = e.total + reference + kv
        most = max(most, total)
        cells = [e.params, e.grads, e.optimizer, e.activations, reference, kv, total]
        rows.append(f"| {stage} ({rank}) | " + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")
    return "\n".join(rows), most


def plan_from_flags(ns: argparse.Namespace, world_size: int) -> tuple[MegaliteConfig, RLConfig, RLPlan]:
    config, rl = config_from_namespace(ns), section_from_namespace(ns, RLConfig)
    counts = [(path, count_prompts(path)) for path in config.data.data_path or []]
    eval_prompts = sum(count_prompts(path, "--ppo-eval-data-path") for path in rl.ppo_eval_data_path or [])
    config, plan = plan_rl(config, rl, world_size, counts, eval_prompts)
    return config, rl, plan


def main(argv: list[str]) -> int:
    parser = build_rl_parser("megalite plan rl")
    extra = parser.add_argument_group("plan")
    extra.add_argument("--world-size", type=int, required=True, help="Number of ranks (GPUs) of the job.")
    extra.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="Device whose kernels set the widths of dropout masks and norm statistics.")
    extra.add_argument("--device-memory-gib", type=float, default=None,
                       help="Memory of one device: say whether the job fits.")
    ns = parser.parse_args(argv)
    config, rl, plan = plan_from_flags(ns, ns.world_size)
    print(f"RL job on {ns.world_size} ranks:")
    print(plan.table(rl))
    table, most = memory_table(config, rl, ns.world_size, ns.device)
    print(f"memory estimate per rank ({ns.device} kernels), one rank per pipeline stage:")
    print(table)
    fits = ""
    if ns.device_memory_gib:
        fits = (f"; fits a {ns.device_memory_gib:g} GiB device" if most <= ns.device_memory_gib * GIB else
                f"; does NOT fit a {ns.device_memory_gib:g} GiB device")
    print(f"most: {most / GIB:.2f} GiB{fits}")
    return 0
