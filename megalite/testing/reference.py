"""Train a few steps of any layout on a deterministic synthetic dataset (or, with --sft, the conversation files the
flags name) and collect what the single-process run must reproduce: the loss of every step and the full (gathered)
parameters afterwards."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.checkpoint import TrainState, load_checkpoint, save_checkpoint
from megalite.data.gpt_dataset import document_position_ids
from megalite.distributed import init_distributed
from megalite.engine.losses import CrossEntropyLoss, Loss
from megalite.engine.setup import setup
from megalite.engine.step import forward_backward, optimizer_step
from megalite.tensor_parallel import gather_full, get_spec
from megalite.training import checkpoint_meta, global_batch


class SyntheticDataset(torch.utils.data.Dataset):
    """Sample i: random tokens and a loss mask with some zeros, drawn from (seed, i) alone. With `documents`, about
    one token in ten becomes the end-of-document token 0, and `position_ids` restart after it (as
    --reset-position-ids numbers them). With `extras`, a per-token field `token_weight` [s] and a per-sample field
    `sample_weight` [] for losses that read more than the tokens (e.g. RL advantages)."""

    EOD = 0

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int = 0, documents: bool = False,
                 extras: bool = False, routing: tuple[int, int, int] | None = None):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed
        self.documents, self.extras, self.routing = documents, extras, routing

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        tokens = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        mask = (torch.rand(self.seq_length, generator=g) > 0.15).float()
        if self.documents:
            tokens[torch.rand(self.seq_length + 1, generator=g) < 0.1] = self.EOD
        sample = {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": mask,
                  "position_ids": document_position_ids(tokens[:-1], self.EOD)}
        if self.extras:
            sample["token_weight"] = torch.rand(self.seq_length, generator=g) * 2
            sample["sample_weight"] = torch.randn((), generator=g)
        if self.routing is not None:  # recorded experts for routing replay: k distinct of E per token and layer
            layers, k, experts = self.routing
            sample["routed_experts"] = torch.rand(self.seq_length, layers, experts, generator=g).argsort(-1)[..., :k]
        return sample


def train_and_collect(argv: list[str], steps: int = 3, lr: float | None = None, loss: Loss | None = None,
                      save: tuple[str, int] | None = None, load: str | None = None, replay: bool = False) -> dict:
    """Run `steps` optimizer steps with the flags `argv` on the current world (with `loss`, on a dataset with the
    extra fields; with `replay`, with recorded experts that every MoE layer routes to); with `load`, first resume
    from that checkpoint directory; with `save` = (directory, iteration), save a checkpoint when that iteration is
    reached. Return this rank's losses, its parameters gathered to full tensors (keyed by global name) and whether
    it logs the loss."""
    init_distributed("gloo")
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived)
    m = config.model
    routing = (sum(m.is_moe_layer(i) for i in range(m.num_layers)), m.moe_router_topk, m.num_experts)
    dataset = sft_dataset(config) if config.sft.sft else SyntheticDataset(
        m.vocab_size, m.seq_length, 1 << 30, documents=config.data.reset_position_ids, extras=loss is not None,
        routing=routing if replay else None)
    state = TrainState()
    if load is not None:
        state = load_checkpoint(load, run, checkpoint_meta(run)).state
    losses = []
    for _ in range(steps):
        run.reducer.zero_grad()
        batches = global_batch(run, dataset, state.consumed_samples)
        losses.append(forward_backward(run, batches, loss or CrossEntropyLoss()).loss)
        optimizer_step(run, lr if lr is not None else config.training.lr)
        state.iteration += 1
        state.consumed_samples += derived.global_batch_size
        if save is not None and state.iteration == save[1]:
            save_checkpoint(save[0], state, run, checkpoint_meta(run))
    params = {
        name: gather_full(p.detach().float(), get_spec(p), getattr(run.groups, get_spec(p).group))
        for chunk in run.chunks for name, p in chunk.named_parameters()
    }
    result = {"losses": losses, "params": params, "logs": run.logs}
    ps.destroy_model_parallel(run.groups)
    return result


def sft_dataset(config) -> torch.utils.data.Dataset:
    """The --sft training set the flags name (conversation files, packed)."""
    from megalite.data.tokenizers import build_tokenizer
    from megalite.sft.dataset import build_sft_datasets

    return build_sft_datasets(config, build_tokenizer(config.data, config.model.vocab_size), (1 << 20, 0, 0))[0]


def merged_params(results: list[dict]) -> dict[str, torch.Tensor]:
    """One full tensor per parameter name across every rank's result (checking that copies agree)."""
    merged: dict[str, torch.Tensor] = {}
    for r in results:
        for name, value in r["params"].items():
            if name in merged:
                assert torch.equal(merged[name], value), f"ranks disagree on {name}"
            else:
                merged[name] = value
    return merged


def logged_losses(results: list[dict]) -> list[float]:
    return next(r["losses"] for r in results if r["logs"])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_matches_single_process(world_size: int, argv: list[str], micro_batch_size: int | None = None,
                                  steps: int = 3, tolerance: float = 1e-5, loss: Loss | None = None,
                                  replay: bool = False) -> dict:
    """Train `steps` steps of `argv` (with `loss`, default cross entropy) on `world_size` gloo ranks and on this
    process alone (see `reference_argv`); assert the same loss at every step and the same full parameters afterwards
    (relative error < tolerance); with `replay`, every MoE layer routes to recorded experts from the data. Call from
    the test process with a world of one initialised. Returns the reference result."""
    from megalite.testing.pool import run_distributed

    results = run_distributed(world_size, train_and_collect, argv, steps, None, loss, None, None, replay)
    ref = train_and_collect(reference_argv(argv, micro_batch_size), steps, None, loss, replay=replay)
    losses = logged_losses(results)
    assert len(losses) == steps
    for got, want in zip(losses, ref["losses"]):
        assert abs(got - want) / abs(want) < tolerance, (losses, ref["losses"])
    params = merged_params(results)
    assert params.keys() == ref["params"].keys()
    for key, want in ref["params"].items():
        assert relative_error(params[key], want) < tolerance, key
    return ref


PARALLEL_FLAGS = (
    "--tensor-model-parallel-size", "--context-parallel-size", "--pipeline-model-parallel-size",
    "--expert-model-parallel-size", "--expert-tensor-parallel-size", "--num-layers-per-virtual-pipeline-stage",
    "--pipeline-schedule", "--sequence-parallel", "--micro-batch-size", "--cp-comm-type",
)


def reference_argv(argv: list[str], micro_batch_size: int | None = None) -> list[str]:
    """The same run on one process: parallel flags removed; one microbatch of the whole global batch, or
    microbatches of `micro_batch_size` (MoE: the aux loss is a mean over each microbatch, so the split matters)."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if flag in PARALLEL_FLAGS:
            i += 2 if takes_value else 1
            continue
        out.append(flag)
        i += 1
    mbs = micro_batch_size or parse_args(argv).training.global_batch_size
    return out + ["--micro-batch-size", str(mbs)]

