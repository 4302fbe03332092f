"""`megalite plan memory`: the estimate of every pipeline stage, on the meta device with fake ranks, equals the
one the real run prints; parameters keep their shard specs wherever the model is built."""
import json
import subprocess
import sys

import torch.distributed as dist

from megalite.arguments import parse_args, resolve
from megalite.memory import MemoryEstimate
from megalite.testing import run_distributed

FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--seq-length", "32", "--vocab-size", "256", "--micro-batch-size", "1", "--global-batch-size", "8",
         "--swiglu", "--bf16", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
         "--moe-layer-freq", "2", "--moe-shared-expert-intermediate-size", "32",
         "--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
         "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1", "--pipeline-schedule", "zb-h1",
         "--use-distributed-optimizer"]
WORLD = 8


def _real_estimate(argv):
    from megalite import parallel_state as ps
    from megalite.tensor_parallel.sharding import get_spec
    from megalite.engine.setup import rank_memory_estimate, setup

    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived)
    estimate = rank_memory_estimate(config, derived, run.chunks, run.schedule(), run.groups, "cpu")
    groups = {get_spec(p).data_parallel_group for p in run.model.parameters()}
    ps.destroy_model_parallel(run.groups)
    return estimate, groups


PLAN = """
import dataclasses, json, sys
from megalite.arguments import parse_args
from megalite.plan_memory import stage_estimates
print(json.dumps([(r, dataclasses.asdict(e)) for r, e in stage_estimates(parse_args(sys.argv[1:]), 8, "cpu")]))
"""


def _in_a_fresh_process(*args: str) -> subprocess.CompletedProcess:
    """The fake process group must be the process's default group: not in a test process that has one."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, check=True)


def test_plan_memory_equals_the_estimate_of_the_real_run():
    real = run_distributed(WORLD, _real_estimate, FLAGS)
    assert all(groups == {"dp_cp", "edp"} for _, groups in real)  # the specs survived the move to bf16
    planned = json.loads(_in_a_fresh_process("-c", PLAN, *FLAGS).stdout)
    assert [rank for rank, _ in planned] == [0, 4]  # the first rank of each pipeline stage (order tp-cp-ep-dp-pp)
    for rank, estimate in planned:
        assert MemoryEstimate(**estimate) == real[rank][0], rank
    replicated = 12 * real[0][0].params / 2  # bf16 weights: 2 bytes each; 12 bytes of optimizer state each
    assert planned[0][1]["optimizer"] < replicated  # the distributed optimizer's share


def test_plan_memory_prints_a_table_per_stage():
    out = _in_a_fresh_process("-m", "megalite", "plan", "memory", *FLAGS, "--world-size", str(WORLD)).stdout
    assert "| 0 (0) |" in out and "| 1 (4) |" in out and "most:" in out
