"""DP in {2, 4}, alone and with TP=2 + SP: same losses and parameters after 3 AdamW steps as one process over the
same global batches, with gradient accumulation (2 microbatches per step)."""
import pytest

from megalite.arguments import parse_args, resolve
from megalite.testing import run_distributed
from megalite.testing.reference import (
    assert_matches_single_process,
    logged_losses,
    merged_params,
    reference_argv,
    relative_error,
    train_and_collect,
)

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "64", "--seq-length", "16", "--vocab-size", "128", "--global-batch-size", "8",
         "--lr", "0.01", "--clip-grad", "1.0", "--weight-decay", "0.1", "--swiglu",
         # Adam's first steps are ~sign(g): gradients that are zero in exact arithmetic (a key bias) or tiny
         # amplify fp32 summation-order noise. No biases, and eps 1e-5 keep the comparison about parallelism, not
         # rounding (measured, worst parameter error after 3 steps: 1.3e-5 at eps 1e-8; at 1e-6 1.7e-6 with SDPA's
         # attention and 1.1e-5 with the blocked CPU kernel, whose heads are bitwise equal in every layout but
         # round differently from SDPA's: chaos, not a layout error; 7.5e-7 at 1e-5).
         "--disable-bias-linear", "--adam-eps", "1e-5"]

LAYOUTS = {
    "dp2": (2, ["--micro-batch-size", "2"]),
    "dp4": (4, ["--micro-batch-size", "1", "--overlap-grad-reduce", "--ddp-bucket-size", "3000"]),
    "dp2_tp2_sp": (4, ["--micro-batch-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--untie-embeddings-and-output-weights"]),
    "dp4_tp2_sp": (8, ["--micro-batch-size", "1", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--overlap-grad-reduce", "--ddp-bucket-size", "5000"]),
    # the distributed optimizer: odd bucket sizes so that shards cut through parameters
    "dp2_distributed_optimizer": (2, ["--micro-batch-size", "2", "--use-distributed-optimizer",
                                      "--ddp-bucket-size", "777"]),
    "dp4_tp2_sp_distributed_optimizer_overlap": (8, ["--micro-batch-size", "1", "--tensor-model-parallel-size", "2",
                                                     "--sequence-parallel", "--use-distributed-optimizer",
                                                     "--overlap-grad-reduce", "--ddp-bucket-size", "3001"]),
    "dp2_pp2_tied_distributed_optimizer": (4, ["--micro-batch-size", "1", "--pipeline-model-parallel-size", "2",
                                               "--use-distributed-optimizer"]),
}



@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_data_parallel_matches_single_process(name, world_of_one):
    world, flags = LAYOUTS[name]
    argv = MODEL + flags
    ref = assert_matches_single_process(world, argv)
    # the steps really changed the parameters
    initial = train_and_collect(reference_argv(argv), steps=0)["params"]
    assert max(relative_error(ref["params"][k], initial[k]) for k in initial) > 1e-3


def _main_weight_elements(argv: list[str]) -> int:
    """How many fp32 main-weight elements this rank's optimizer holds (each has two Adam moments too)."""
    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.engine.setup import setup

    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived)
    count = sum(m.numel() for m in run.optimizer.main)
    ps.destroy_model_parallel(run.groups)
    return count


def test_distributed_optimizer_holds_a_dp_share_of_the_states():
    argv = MODEL + ["--micro-batch-size", "1", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    plain = run_distributed(8, _main_weight_elements, argv)
    sharded = run_distributed(8, _main_weight_elements, argv + ["--use-distributed-optimizer"])
    assert len(set(plain)) == 1  # TP shards of equal size
    assert sum(sharded) == sum(plain) // 4  # dp = 4: every element updated by exactly one rank of its DP group
    assert max(sharded) - min(sharded) < 4 * 4  # even shares, up to each bucket's padding (< dp; <= 4 buckets)


def test_distributed_optimizer_matches_the_replicated_one_in_bf16():
    argv = MODEL + ["--micro-batch-size", "1", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--bf16"]
    plain = run_distributed(8, train_and_collect, argv, 3)
    sharded = run_distributed(8, train_and_collect, argv + ["--use-distributed-optimizer"], 3)
    assert logged_losses(sharded) == pytest.approx(logged_losses(plain), rel=1e-3)
    want, got = merged_params(plain), merged_params(sharded)
    assert max(relative_error(got[k].float(), want[k].float()) for k in want) < 1e-2


def _gradient_traffic(argv: list[str]) -> dict[str, int]:
    """Bytes this rank sends into data-parallel collectives during one training step."""
    import torch.distributed as dist

    from megalite import comm
    from megalite import parallel_state as ps
    from megalite.testing.reference import SyntheticDataset
    from megalite.engine.setup import setup
    from megalite.engine.step import forward_backward, optimizer_step
    from megalite.training import global_batch

    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived)
    batches = global_batch(run, SyntheticDataset(128, 16, derived.global_batch_size), 0)
    run.reducer.zero_grad()
    with comm.count_comm() as counter:
        forward_backward(run, batches)
        optimizer_step(run, 0.01)
    grads = sum(b.buffer.numel() * 4 for b in run.reducer.buckets)
    ps.destroy_model_parallel(run.groups)
    return {kind: counter.total(kind, "dp") for kind in ("all_reduce", "reduce_scatter", "all_gather")} | \
        {"buffers": grads}


def test_distributed_optimizer_reduce_scatters_the_gradients_and_all_gathers_a_share_of_the_weights():
    argv = MODEL + ["--micro-batch-size", "1", "--ddp-bucket-size", "1000"]
    plain = run_distributed(4, _gradient_traffic, argv)[0]
    zero = run_distributed(4, _gradient_traffic, argv + ["--use-distributed-optimizer"])[0]
    # group names start with "dp": the DP x CP group is created as "dp[...]" (CP = 1). Besides the gradients:
    # the step's loss-token count and loss sum, 8 bytes each.
    assert plain["all_reduce"] == plain["buffers"] + 16 and plain["reduce_scatter"] == plain["all_gather"] == 0
    assert zero["reduce_scatter"] == zero["buffers"] and zero["all_gather"] == zero["buffers"] // 4
    assert zero["all_reduce"] == 16
