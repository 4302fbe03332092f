"""Gradient-accumulation fusion: fp32 weight gradients of linear layers and of the grouped experts written straight
into the main gradients (`ModelContext.grad_sink`) give the gradients of the plain path (autograd's gradient, added
by the reducer's hook), for a dense and a MoE model with a tied embedding (which keeps the autograd path), over two
microbatches; and the sink is really used."""
import pytest
import torch

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.engine.setup import setup
from megalite.engine.step import forward_backward
from megalite.testing.reference import SyntheticDataset
from megalite.training import global_batch

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "64", "--seq-length", "16", "--vocab-size", "128", "--global-batch-size", "4",
         "--micro-batch-size", "2", "--swiglu", "--disable-bias-linear"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--moe-aux-loss-coeff", "0.01"]


def gradients(argv: list[str], fused: bool) -> tuple[dict[str, torch.Tensor], int]:
    config, derived = resolve(parse_args(argv), 1)
    run = setup(config, derived)
    calls = []
    sink = run.context.grad_sink

    def counting(p, write):
        calls.append(p)
        return sink(p, write)

    run.context.grad_sink = counting if fused else None
    run.reducer.zero_grad()
    forward_backward(run, global_batch(run, SyntheticDataset(config.model.vocab_size, 16, 8), 0))
    grads = {n: p.main_grad.clone() for n, p in run.model.named_parameters()}
    ps.destroy_model_parallel(run.groups)
    return grads, len(calls)


@pytest.mark.parametrize("extra", [[], MOE], ids=["dense", "moe"])
def test_fused_gradients_equal_the_autograd_path(world_of_one, extra):
    plain, none = gradients(MODEL + extra, fused=False)
    fused, calls = gradients(MODEL + extra, fused=True)
    assert none == 0 and calls > 0
    for name, want in plain.items():
        torch.testing.assert_close(fused[name], want, rtol=1e-5, atol=1e-7, msg=name)
        assert want.abs().sum() > 0, name  # every parameter got a gradient
