"""LR schedules, fp16 loss scaling with skipped steps, and gradient clipping with every shard counted once."""
import math
import re

import pytest
import torch

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.optim.ddp import GradReducer
from megalite.optim.lr_schedule import LRSchedule
from megalite.optim.optimizer import LossScaler, MixedPrecisionAdamW, global_grad_norm
from megalite.testing import run_distributed
from megalite.testing.reference import SyntheticDataset, reference_argv
from megalite.checkpoint import TrainState
from megalite.engine.log import Logger
from megalite.engine.setup import setup
from megalite.engine.step import forward_backward
from megalite.training import global_batch, train


def test_lr_schedule_values():
    cos = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="cosine")
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = LRSchedule(max_lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=100, style="linear")
    assert lin(25) == pytest.approx(0.75)
    const = LRSchedule(max_lr=0.5, min_lr=0.0, warmup_iters=4, decay_iters=100, style="constant")
    assert const(1) == pytest.approx(0.25) and const(99) == pytest.approx(0.5)
    wsd = LRSchedule(max_lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=100, style="WSD", wsd_decay_iters=20)
    assert wsd(79) == pytest.approx(1.0) and wsd(90) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr-decay-style"):
        LRSchedule(1.0, 0.0, 0, 10, style="exp")


def test_loss_scaler_halves_on_overflow_and_doubles_after_a_clean_window():
    s = LossScaler(scale=1024.0, min_scale=1.0, window=3)
    s.update(overflow=True)
    assert s.scale == 512.0
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 1024.0


TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "128", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
        "--log-interval", "1"]


@pytest.fixture
def no_groups(world_of_one):
    """A world of one; each test destroys the model-parallel groups of the runs it sets up."""
    yield


def test_fp16_overflow_steps_are_skipped_and_logged(no_groups, capsys):
    config, derived = resolve(parse_args(TINY + ["--fp16", "--initial-loss-scale", str(2.0**40)]), 1)
    run = setup(config, derived)
    before = [p.detach().clone() for p in run.model.parameters()]
    data = SyntheticDataset(128, 16, 64)
    state = train(run, data, None, TrainState(), Logger(run))
    out = capsys.readouterr().out
    assert state.skipped_steps >= 1 and "skipped: inf/NaN gradients" in out
    assert run.optimizer.loss_scale < 2.0**40
    assert run.chunks[0].embedding.weight.dtype == torch.float16
    changed = any(not torch.equal(b, p) for b, p in zip(before, run.model.parameters()))
    assert changed == (state.skipped_steps < 6)


def test_a_skipped_step_leaves_the_weights_alone(solo_groups):
    config, _ = resolve(parse_args(TINY + ["--fp16"]), 1)
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    reducer = GradReducer([p], solo_groups)
    p.main_grad.copy_(torch.tensor([1.0, float("inf"), 0.0]))
    opt = MixedPrecisionAdamW(reducer, solo_groups, config.training)
    norm, skipped = opt.step(lr=0.1)
    assert skipped and norm is None and torch.equal(p, torch.ones(3, dtype=torch.float16))


@pytest.mark.parametrize("fused", [True, None])
@pytest.mark.parametrize("clip", [0.0, 0.5, 100.0])
def test_clipped_updates_equal_torch_clip_grad_norm_and_adamw(solo_groups, clip, fused):
    """Clipping inside the fused AdamW (its grad_scale) or before the for-loop one: the weights after two steps
    equal torch's clip_grad_norm_ followed by torch's AdamW (weight decay on matrices only)."""
    config, _ = resolve(parse_args(TINY + ["--clip-grad", str(clip), "--weight-decay", "0.1"]), 1)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((4, 3), (5,), (2, 2))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reducer = GradReducer(params, solo_groups)
    opt = MixedPrecisionAdamW(reducer, solo_groups, config.training)
    for group in opt.adam.param_groups:
        group["fused"] = fused
    torch_opt = torch.optim.AdamW([{"params": [ref[0], ref[2]], "weight_decay": 0.1},
                                   {"params": [ref[1]], "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.95))
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=g) * 3 for p in params]
        reducer.zero_grad()
        for p, r, grad in zip(params, ref, grads):
            p.main_grad.copy_(grad)
            r.grad = grad.clone()
        norm, skipped = opt.step(lr=0.01)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip) if clip > 0 else torch.stack(
            [r.grad.norm() for r in ref]).norm()
        torch_opt.step()
        assert not skipped and norm == pytest.approx(ref_norm.item(), rel=1e-6)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def _grad_norm(argv):
    config, derived = resolve(parse_args(argv), torch.distributed.get_world_size())
    run = setup(config, derived)
    data = SyntheticDataset(128, 16, derived.global_batch_size)
    run.reducer.zero_grad()
    forward_backward(run, global_batch(run, data, 0))
    norm = global_grad_norm([s.grad for s in run.optimizer.segments], run.optimizer.counted)
    ps.destroy_model_parallel(run.groups)
    return norm


@pytest.mark.parametrize("flags,world", [
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size", "1"], 4),
    (["--tensor-model-parallel-size", "2", "--untie-embeddings-and-output-weights", "--micro-batch-size", "2"], 2),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size", "1",
      "--use-distributed-optimizer"], 4),
    (["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", "--use-distributed-optimizer"], 4),
])
def test_global_grad_norm_counts_every_shard_once(flags, world, no_groups):
    argv = TINY + ["--global-batch-size", "4"] + flags
    norms = run_distributed(world, _grad_norm, argv)
    ref = _grad_norm(reference_argv(argv))
    assert all(abs(n - ref) / ref < 1e-5 for n in norms), (norms, ref)


def test_bf16_training_keeps_fp32_main_weights_and_learns(no_groups):
    config, derived = resolve(parse_args(TINY + ["--bf16", "--lr", "0.01"]), 1)
    run = setup(config, derived)
    data = SyntheticDataset(128, 16, 64)
    losses = [forward_backward(run, global_batch(run, data, 0)).loss for _ in range(1)]
    for _ in range(5):
        run.reducer.zero_grad()
        losses.append(forward_backward(run, global_batch(run, data, 0)).loss)
        run.optimizer.step(0.01)
    assert run.chunks[0].embedding.weight.dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for m in run.optimizer.main)
    assert losses[-1] < losses[0] - 0.1  # the same batch: bf16 training fits it


def test_validation_loss_and_perplexity_are_logged(no_groups, capsys):
    config, derived = resolve(parse_args(TINY + ["--eval-interval", "3", "--eval-iters", "2"]), 1)
    run = setup(config, derived)
    state = train(run, SyntheticDataset(128, 16, 64), SyntheticDataset(128, 16, 64, seed=1), TrainState(), Logger(run))
    lines = [line for line in capsys.readouterr().out.splitlines() if "validation" in line]
    assert state.iteration == 6 and len(lines) == 2
    loss, ppl = (float(x) for x in re.search(r"loss (\S+) \| perplexity (\S+)", lines[-1]).groups())
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
