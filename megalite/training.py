"""The pretraining loop: configs -> groups, model, optimizer, data -> microbatch loop, logging, eval, checkpoints.

The loss of a step is what one process would compute over the whole global batch: the sum of per-token losses
over every microbatch, DP rank and CP shard, divided by the number of loss tokens in the global batch (counted
up front with one all-reduce). Each rank back-propagates its share, and summing gradients over DP x CP gives the
global-batch gradient exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite import comm
from megalite import parallel_state as ps
from megalite.arguments import (
    ConfigError,
    Derived,
    build_parser,
    config_from_namespace,
    derive_train_length_from_epochs,
    resolve,
    to_argv,
)
from megalite.checkpoint import TrainState, latest_iteration, load_checkpoint, save_checkpoint
from megalite.config import MegaliteConfig
from megalite.context_parallel import zigzag_positions, zigzag_shard
from megalite.distributed import device as current_device
from megalite.distributed import init_distributed, launched_world_size
from megalite.memory import MemoryEstimate, estimate_memory
from megalite.models.gpt import GPTModel
from megalite.moe import pop_aux_losses, set_aux_loss_scale, update_expert_biases
from megalite.optim.ddp import GradReducer
from megalite.optim.lr_schedule import schedule_from_config
from megalite.optim.optimizer import MixedPrecisionAdamW
from megalite.parallel_state import ProcessGroups
from megalite.pipeline.runtime import PipelineRuntime
from megalite.pipeline.schedules import Schedule, build_schedule, peak_activations
from megalite.tensor_parallel import model_parallel_seed

Batch = dict[str, torch.Tensor]


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The vocabulary padded up to a multiple of --make-vocab-size-divisible-by (independent of the layout)."""
    return math.ceil(vocab_size / multiple) * multiple


@dataclass
class Run:
    """Everything a training run holds. `model` holds this rank's model chunks (one per pipeline stage it runs)."""

    config: MegaliteConfig
    derived: Derived
    groups: ProcessGroups
    model: torch.nn.ModuleList
    reducer: GradReducer
    optimizer: MixedPrecisionAdamW
    device: torch.device
    dtype: torch.dtype
    schedule: Schedule | None
    """The pipeline schedule; None without pipeline parallelism."""
    last_bubble: float = 0.0
    """Idle fraction of the last pipelined step on this rank."""

    @property
    def chunks(self) -> list[GPTModel]:
        return list(self.model)

    @property
    def is_last_stage(self) -> bool:
        return any(c.post_process for c in self.chunks)

    @property
    def logs(self) -> bool:
        """This rank prints the log: it holds the last stage, and is the first TP rank and first DP x CP rank."""
        g = self.groups
        return self.is_last_stage and g.rank("tp") == 0 and g.rank("dp_cp") == 0


def with_vocab_size(config: MegaliteConfig, tokenizer_vocab: int) -> MegaliteConfig:
    """`config` with the model's vocabulary: --vocab-size, else the tokenizer's padded to
    --make-vocab-size-divisible-by."""
    m = config.model
    vocab = m.vocab_size or padded_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by)
    return dataclasses.replace(config, model=dataclasses.replace(m, vocab_size=vocab))


def rank_memory_estimate(config: MegaliteConfig, derived: Derived, chunks: list[GPTModel],
                         schedule: Schedule | None, groups: ProcessGroups, device_type: str) -> MemoryEstimate:
    """This rank's memory estimate: its parameters, and the activations of the most microbatches its pipeline
    schedule keeps in flight (one without pipelining; from F until W where the backward is split)."""
    in_flight = 1.0 if schedule is None else peak_activations(schedule, until="W")[groups.rank("pp")]
    return estimate_memory([p for c in chunks for p in c.parameters()], config, derived, in_flight,
                           sum(len(c.layers) for c in chunks), any(c.post_process for c in chunks), device_type)


def pipeline_schedule(config: MegaliteConfig, derived: Derived) -> Schedule | None:
    """The schedule of --pipeline-schedule for this run (None without pipeline parallelism)."""
    p = config.parallel
    if p.pipeline_model_parallel_size == 1:
        return None
    chunks = derived.virtual_pipeline_size if p.pipeline_schedule == "interleaved" else None
    return build_schedule(p.pipeline_schedule, p.pipeline_model_parallel_size, derived.num_microbatches, chunks)


def build_chunks(config: MegaliteConfig, groups: ProcessGroups, schedule: Schedule | None,
                 device: torch.device, dtype: torch.dtype) -> list[GPTModel]:
    """This rank's model chunks on `device`, each initialised from the seed as the full model would be.

    Stage s of S holds layers [s L/S, (s+1) L/S); stage 0 adds the embedding and stage S-1 the head. When one
    rank holds both ends (zb-v), the tied output layer uses the very embedding parameter of the first stage.
    """
    m = config.model
    stages = [0] if schedule is None else [schedule.stage(groups.rank("pp"), c) for c in range(schedule.num_chunks)]
    num_stages = 1 if schedule is None else schedule.num_stages
    per_stage = m.num_layers // num_stages
    chunks = []
    for s in stages:
        # Built on the device (moving a module may replace its parameters, and with them their shard specs);
        # on the meta device (`megalite plan memory`) there is nothing to initialise.
        with device:
            chunk = GPTModel(
                m, groups, vocab_size=m.vocab_size, sequence_parallel=config.parallel.sequence_parallel,
                cp_comm_type=config.parallel.cp_comm_type,
                layer_ids=list(range(s * per_stage, (s + 1) * per_stage)),
                pre_process=s == 0, post_process=s == num_stages - 1,
            )
        if device.type != "meta":
            chunk.initialize(config.training.seed)
        chunks.append(chunk.to(dtype=dtype))
    first = next((c for c in chunks if c.pre_process), None)
    for c in chunks:
        if c.tied and c.post_process and first is not None and c is not first:
            c.embedding = first.embedding
    return chunks


def tied_copies(chunks: list[GPTModel]) -> list[torch.nn.Parameter]:
    """The last stage's copy of a tied embedding whose first stage lives on another rank."""
    if any(c.pre_process for c in chunks):
        return []
    return [c.embedding.weight for c in chunks if c.tied and c.post_process]


def embedding_group_params(chunks: list[GPTModel]) -> list[torch.nn.Parameter]:
    """Tied embedding weights whose gradients are summed over the embedding group (first and last stage on two
    different ranks)."""
    holds_first = any(c.pre_process for c in chunks)
    holds_last = any(c.post_process for c in chunks)
    if holds_first == holds_last or not chunks[0].tied:
        return []
    return [c.embedding.weight for c in chunks if c.pre_process or c.post_process]


def setup(config: MegaliteConfig, derived: Derived) -> Run:
    """Groups, seeds, model chunks, gradient reducer and optimizer for a resolved config."""
    p, t = config.parallel, config.training
    groups = ps.initialize_model_parallel(
        tp=p.tensor_model_parallel_size, cp=p.context_parallel_size, pp=p.pipeline_model_parallel_size,
        ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size, order=p.rank_order,
        timeout_minutes=p.distributed_timeout_minutes,
    )
    device = current_device()
    model_parallel_seed(t.seed, groups.rank("tp"), groups.rank("pp"), device)
    dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
    assert config.model.vocab_size is not None, "resolve the vocabulary first"
    schedule = pipeline_schedule(config, derived)
    chunks = build_chunks(config, groups, schedule, device, dtype)
    model = torch.nn.ModuleList(chunks)
    params = list(model.parameters())
    reducer = GradReducer(params, groups, bucket_size=t.ddp_bucket_size,
                          overlap=t.overlap_grad_reduce and schedule is None,
                          distributed=t.use_distributed_optimizer, tied_params=embedding_group_params(chunks))
    optimizer = MixedPrecisionAdamW(reducer, groups, t, not_counted=tied_copies(chunks))
    return Run(config, derived, groups, model, reducer, optimizer, device, dtype, schedule)


def microbatches(dataset, consumed: int, run: Run) -> list[Batch]:
    """This rank's microbatches of the global batch starting at sample `consumed`, CP-sharded (zigzag)."""
    t, g = run.config.training, run.groups
    dp, dp_rank = g.size("dp"), g.rank("dp")
    cp, cp_rank = g.size("cp"), g.rank("cp")
    out = []
    for j in range(run.derived.num_microbatches):
        start = consumed + (j * dp + dp_rank) * t.micro_batch_size
        samples = [dataset[i] for i in range(start, start + t.micro_batch_size)]
        # positions per sample only when they restart inside it; otherwise 0..s-1 for every row
        keys = ("tokens", "labels", "loss_mask") + (("position_ids",) if run.config.data.reset_position_ids else ())
        batch = {k: torch.stack([s[k] for s in samples]) for k in keys}
        if cp > 1:
            batch = {k: zigzag_shard(v, 1, cp_rank, cp) for k, v in batch.items()}
            batch.setdefault("position_ids", zigzag_positions(run.config.model.seq_length, cp_rank, cp).unsqueeze(0))
        out.append({k: v.to(run.device) for k, v in batch.items()})
    return out


def global_token_count(batches: list[Batch], groups: ProcessGroups) -> torch.Tensor:
    """Loss tokens of the whole global batch (sum over microbatches, DP and CP ranks)."""
    local = torch.stack([b["loss_mask"].sum() for b in batches]).sum().double().reshape(1)
    comm.all_reduce(local, groups.dp_cp)
    return local.clamp_min(1.0)


def runtime(run: Run) -> PipelineRuntime:
    """The pipeline runtime over this rank's chunks; messages are [s/CP (/TP with SP), micro batch, hidden]."""
    g, m = run.groups, run.config.model
    seq = m.seq_length // g.size("cp") // (g.size("tp") if run.config.parallel.sequence_parallel else 1)
    shape = (seq, run.config.training.micro_batch_size, m.hidden_size)
    return PipelineRuntime(run.schedule, run.chunks, g, shape, run.dtype, run.device)


def forward_backward(run: Run, batches: list[Batch]) -> float:
    """Gradient accumulation over the step's microbatches (pipelined when PP > 1); returns the global-batch loss
    on the ranks of the last stage."""
    tokens = global_token_count(batches, run.groups)
    scale = run.optimizer.loss_scale
    # MoE aux losses are means over one DP replica's microbatch: average them over microbatches and DP ranks.
    set_aux_loss_scale(scale / (len(batches) * run.groups.size("dp")))
    total = torch.zeros(1, dtype=torch.float64, device=run.device)
    if run.schedule is not None:
        share = lambda losses, b: (losses * b["loss_mask"]).sum() / tokens  # noqa: E731
        total, record = runtime(run).run(batches, share, scale)
        run.last_bubble = record.bubble
    else:
        for j, b in enumerate(batches):
            if j == len(batches) - 1:
                run.reducer.last_microbatch()
            losses = run.chunks[0](b["tokens"], b.get("position_ids"), b["labels"])
            loss = (losses * b["loss_mask"]).sum() / tokens
            (loss * scale).backward()
            total += loss.detach()
    run.reducer.finish()
    comm.all_reduce(total, run.groups.dp_cp)
    return total.item()


def optimizer_step(run: Run, lr: float) -> tuple[float | None, bool]:
    """Update the weights (and the MoE expert biases); returns (grad norm, skipped)."""
    grad_norm, skipped = run.optimizer.step(lr)
    if not skipped:
        update_expert_biases(run.model, run.groups)
    return grad_norm, skipped


@torch.no_grad()
def evaluate(run: Run, dataset, start: int, iters: int) -> float:
    """Mean loss per token over `iters` global batches of `dataset` from sample `start` (last stage)."""
    run.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    for k in range(iters):
        for b in microbatches(dataset, start + k * run.derived.global_batch_size, run):
            if run.schedule is None:
                losses = run.chunks[0](b["tokens"], b.get("position_ids"), b["labels"])
            else:
                losses = runtime(run).forward_only(b)
            if losses is not None:
                total[0] += (losses.double() * b["loss_mask"]).sum()
                total[1] += b["loss_mask"].sum()
    comm.all_reduce(total, run.groups.dp_cp)
    run.model.train()
    return (total[0] / total[1].clamp_min(1.0)).item()


def bubbles(run: Run) -> str:
    """The measured pipeline bubble of the last step on every pipeline rank (collective over the PP group)."""
    mine = torch.tensor([run.last_bubble], dtype=torch.float64, device=run.device)
    every = torch.empty(run.groups.size("pp"), dtype=torch.float64, device=run.device)
    comm.all_gather_into_tensor(every, mine, run.groups.pp)
    return "/".join(f"{b:.2f}" for b in every.tolist())


def checkpoint_meta(run: Run) -> dict:
    p = run.config.parallel
    return {
        "layout": {"world_size": run.derived.world_size, "tp": p.tensor_model_parallel_size,
                   "cp": p.context_parallel_size, "pp": p.pipeline_model_parallel_size,
                   "ep": p.expert_model_parallel_size, "etp": p.expert_tensor_parallel_size,
                   "rank_order": p.rank_order,
                   "distributed_optimizer": run.config.training.use_distributed_optimizer},
        "model": dataclasses.asdict(run.config.model),
        "args": to_argv(run.config),
    }


class Logger:
    """Log lines on the logging rank, optionally TensorBoard scalars."""

    def __init__(self, run: Run):
        self.enabled = run.logs
        self.writer = None
        if self.enabled and run.config.training.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(run.config.training.tensorboard_dir)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()


def train(run: Run, train_ds, valid_ds, state: TrainState, log: Logger) -> TrainState:
    """The loop from `state.iteration` to --train-iters; returns the final state."""
    t = run.config.training
    schedule = schedule_from_config(t, run.derived.train_iters)
    tokens_per_step = run.derived.global_batch_size * run.config.model.seq_length
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    while state.iteration < run.derived.train_iters:
        batches = microbatches(train_ds, state.consumed_samples, run)
        run.reducer.zero_grad()
        loss = forward_backward(run, batches)
        lr = schedule(state.iteration)
        grad_norm, skipped = optimizer_step(run, lr)
        state.iteration += 1
        state.consumed_samples += run.derived.global_batch_size
        state.skipped_steps += int(skipped)
        if skipped:
            log.line(f" iteration {state.iteration:8d} | skipped: inf/NaN gradients (loss scale now "
                     f"{run.optimizer.loss_scale:.1f})")
        else:
            window_loss += loss
            window_steps += 1
        if state.iteration % t.log_interval == 0 or state.iteration == run.derived.train_iters:
            elapsed = time.perf_counter() - window_start
            steps = t.log_interval if state.iteration % t.log_interval == 0 else state.iteration % t.log_interval
            mean_loss = window_loss / max(1, window_steps)
            extra = f" | bubble per stage {bubbles(run)}" if run.schedule is not None else ""
            if run.device.type == "cuda":
                extra += f" | max memory {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB"
            aux = pop_aux_losses()
            for kind in ("load_balancing_loss", "z_loss"):
                values = [v for k, v in aux.items() if k.startswith(kind)]
                if values:
                    extra += f" | {kind.replace('_', ' ')} {sum(values) / len(values):.4f}"
            log.line(
                f" iteration {state.iteration:8d}/{run.derived.train_iters} | consumed samples "
                f"{state.consumed_samples:10d} | lr {lr:.3e} | loss {mean_loss:.6e} | grad norm "
                f"{(grad_norm or float('nan')):.3f} | tokens/s {tokens_per_step * steps / elapsed:10.1f} | "
                f"ms/step {1000 * elapsed / steps:8.1f} | skipped {state.skipped_steps}{extra}"
            )
            log.scalars(state.iteration, {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm or float("nan")})
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        if t.eval_interval and valid_ds is not None and state.iteration % t.eval_interval == 0:
            start = (state.iteration // t.eval_interval - 1) * t.eval_iters * run.derived.global_batch_size
            val = evaluate(run, valid_ds, start, t.eval_iters)
            log.line(f" validation at iteration {state.iteration} | loss {val:.4f} | perplexity "
                     f"{math.exp(min(val, 50)):.2f}")
            log.scalars(state.iteration, {"val_loss": val})
        if t.save and t.save_interval and state.iteration % t.save_interval == 0:
            save_checkpoint(t.save, state, run.model, run.optimizer, checkpoint_meta(run))
        if t.exit_interval and state.iteration % t.exit_interval == 0:
            break
    return state


def pretrain(config: MegaliteConfig) -> TrainState:
    """Initialise the processes, build everything from `config` and train."""
    from megalite.data import build_gpt_datasets, samples_per_epoch
    from megalite.data.tokenizers import build_tokenizer

    init_distributed(config.parallel.distributed_backend, config.parallel.distributed_timeout_minutes)
    config, derived = resolve(config, dist.get_world_size())
    tokenizer = build_tokenizer(config.data)
    config = with_vocab_size(config, tokenizer.vocab_size)
    vocab = config.model.vocab_size
    if derived.train_iters is None:
        config, iters = derive_train_length_from_epochs(config, samples_per_epoch(config, tokenizer))
        derived = dataclasses.replace(derived, train_iters=iters, train_samples=config.training.train_samples)
    if dist.get_rank() == 0:
        print(derived.table(), flush=True)
        print(f"vocabulary: {tokenizer.vocab_size} tokens, padded to {vocab}", flush=True)
    run = setup(config, derived)
    t = config.training
    eval_samples = 0
    if t.eval_interval:
        eval_samples = (derived.train_iters // t.eval_interval + 1) * t.eval_iters * derived.global_batch_size
    train_ds, valid_ds, _ = build_gpt_datasets(config, tokenizer, (derived.train_samples, eval_samples, 0))
    state = TrainState()
    if t.load and latest_iteration(t.load) is not None:
        state = load_checkpoint(t.load, run.model, run.optimizer, checkpoint_meta(run),
                                load_optim=not t.no_load_optim, load_rng=not t.no_load_rng, finetune=t.finetune)
        if run.logs:
            print(f"resumed from {t.load} at iteration {state.iteration}", flush=True)
    log = Logger(run)
    log.line(f"model: {sum(p.numel() for p in run.model.parameters()):,} parameters on this rank; "
             f"layout {json.dumps(checkpoint_meta(run)['layout'])}")
    log.line(rank_memory_estimate(config, derived, run.chunks, run.schedule, run.groups, run.device.type).line())
    state = train(run, train_ds, valid_ds, state, log)
    if t.save and not (t.save_interval and state.iteration % t.save_interval == 0):
        save_checkpoint(t.save, state, run.model, run.optimizer, checkpoint_meta(run))
    ps.destroy_model_parallel()
    return state


def main(argv: list[str]) -> int:
    """`megalite train`: validate the flags, print the derived values and train."""
    parser = build_parser()
    config = config_from_namespace(parser.parse_args(argv))
    try:
        resolve(config, launched_world_size())
    except ConfigError as e:
        parser.error(str(e))
    pretrain(config)
    dist.destroy_process_group()
    return 0
