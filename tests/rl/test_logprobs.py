"""Old/reference log-probabilities of a sample set on a layout equal the single process's log_softmax of the full
forward, on every rank: TP2+SP+CP2 and PP2 (zb-v, one rank holding both ends) with DP."""
import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.engine.setup import setup
from megalite.rl.logprobs import sequence_logprobs
from megalite.testing import run_distributed
from megalite.testing.reference import SyntheticDataset

MODEL = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "48", "--swiglu", "--vocab-size", "128", "--seq-length", "16", "--global-batch-size", "8",
         "--hidden-dropout", "0.1"]
SAMPLES = [SyntheticDataset(128, 16, 8, seed=4)[i] for i in range(8)]


def logprobs_of(argv: list[str]) -> torch.Tensor:
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived)
    out = sequence_logprobs(run, SAMPLES, 2)
    assert run.model.training  # restored after the eval-mode pass
    ps.destroy_model_parallel(run.groups)
    return out


def reference() -> torch.Tensor:
    config, derived = resolve(parse_args(MODEL + ["--micro-batch-size", "8"]), 1)
    run = setup(config, derived)
    run.model.eval()
    with torch.no_grad():
        logits = run.chunks[0](torch.stack([s["tokens"] for s in SAMPLES]))
    labels = torch.stack([s["labels"] for s in SAMPLES])
    ps.destroy_model_parallel(run.groups)
    return torch.log_softmax(logits.float(), -1)[..., :128].gather(2, labels.unsqueeze(2)).squeeze(2)


@pytest.mark.parametrize("world, flags", [
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
         "--micro-batch-size", "2"]),
    (4, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-v", "--micro-batch-size", "1"]),
], ids=["tp2_sp_cp2_dp1", "zbv_pp2_dp2"])
def test_sample_logprobs_on_layouts(world_of_one, world, flags):
    want = reference()
    assert torch.allclose(logprobs_of(MODEL + ["--micro-batch-size", "2"]), want, rtol=1e-5, atol=1e-5)
    for got in run_distributed(world, logprobs_of, MODEL + flags):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
