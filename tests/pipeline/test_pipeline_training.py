"""PP in {2, 4} x every schedule, also with TP=2 + SP and DP=2, and with tied embeddings: the same losses and
parameters after 3 steps as the single-process run."""
import pytest

from megalite.testing import run_distributed
from megalite.testing.reference import assert_matches_single_process

MODEL = ["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
         "--seq-length", "16", "--vocab-size", "128", "--global-batch-size", "8", "--lr", "0.01",
         "--swiglu", "--disable-bias-linear",
         # Adam turns fp32 summation-order noise into update noise. Measured on this 8-layer model, plain gradient
         # accumulation on one process (4 x 2 vs 1 x 8 samples) already differs by 1.06e-5 at eps 1e-6; at eps
         # 1e-4 pp2/1f1b differs by 1.4e-6. A parallelism bug shows up orders of magnitude above that.
         "--adam-eps", "1e-4"]

SCHEDULES = {
    "1f1b": ["--pipeline-schedule", "1f1b"],
    "interleaved": ["--pipeline-schedule", "interleaved", "--num-layers-per-virtual-pipeline-stage", "1"],
    "zb-h1": ["--pipeline-schedule", "zb-h1"],
    "zb-v": ["--pipeline-schedule", "zb-v"],
}

CASES = {
    # name: (world, flags)
    **{f"pp2_{s}": (2, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2", *f])
       for s, f in SCHEDULES.items()},
    **{f"pp4_{s}_untied": (4, ["--pipeline-model-parallel-size", "4", "--micro-batch-size", "1",
                               "--untie-embeddings-and-output-weights", *f]) for s, f in SCHEDULES.items()},
    "pp2_tp2_sp_dp2_1f1b": (8, ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                "--sequence-parallel", "--micro-batch-size", "2", *SCHEDULES["1f1b"]]),
    "pp2_tp2_sp_dp2_zb-v": (8, ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                "--sequence-parallel", "--micro-batch-size", "1", *SCHEDULES["zb-v"]]),
    "pp2_tp2_sp_dp2_interleaved": (8, ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                       "--sequence-parallel", "--micro-batch-size", "1", *SCHEDULES["interleaved"]]),
    # split backward under recomputation: the W pass must reach the parameters, not checkpointing's detached
    # copies of them (found by the layout sweep: every layer weight lost its gradient)
    "pp2_zb-h1_full_recompute": (2, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
                                     "--recompute-granularity", "full", *SCHEDULES["zb-h1"]]),
    "pp2_zb-v_tp2_sp_selective_recompute": (4, ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size",
                                                "2", "--sequence-parallel", "--micro-batch-size", "1",
                                                "--recompute-granularity", "selective", *SCHEDULES["zb-v"]]),
}



@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_matches_single_process(name, world_of_one):
    world, flags = CASES[name]
    assert_matches_single_process(world, MODEL + flags)


def _measured_bubbles(argv):
    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.arguments import parse_args, resolve
    from megalite.testing.reference import SyntheticDataset
    from megalite.engine.log import bubbles
    from megalite.engine.setup import setup
    from megalite.engine.step import forward_backward
    from megalite.training import global_batch

    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived)
    result = forward_backward(run, global_batch(run, SyntheticDataset(128, 16, 8), 0))
    per_stage = bubbles(run, result.bubble)
    ps.destroy_model_parallel(run.groups)
    return result.bubble, per_stage


def test_the_runtime_measures_each_ranks_bubble(world_of_one):
    argv = MODEL + ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", *SCHEDULES["1f1b"]]
    (b0, text0), (b1, text1) = run_distributed(2, _measured_bubbles, argv)
    assert 0.0 < b0 < 1.0 and 0.0 < b1 < 1.0
    assert text0 == text1 == f"{b0:.2f}/{b1:.2f}"
