"""The training loop of `megalite train` (`megalite.pretrain` sets it up): global batches with cross entropy on the
step engine, checks that stop a poisoned run, evaluation, checkpoints and the log line; everything a step does lives
in `megalite.engine`.

The loss of a step is what one process would compute over the whole global batch: the sum of per-token losses over
every microbatch, DP rank and CP shard, divided by the number of loss tokens in the global batch (counted up front
with one all-reduce). Each rank back-propagates its share, and summing gradients over DP x CP gives the global-batch
gradient exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megalite import comm
from megalite.arguments import ConfigError, to_argv
from megalite.checkpoint import TrainState, save_checkpoint
from megalite.engine.batches import Batch, microbatches
from megalite.engine.checks import check_token_ids
from megalite.engine.log import Logger, aux_loss_summary, bubbles, duration
from megalite.engine.prefetch import Prefetcher
from megalite.engine.setup import Run
from megalite.engine.step import evaluate, forward_backward, optimizer_step
from megalite.errors import TrainingError
from megalite.flops import device_peak_tflops, step_flops, throughput_summary
from megalite.optim.lr_schedule import schedule_from_config


def global_batch(run: Run, dataset, consumed: int) -> list[Batch]:
    """This rank's microbatches of the global batch of `dataset` that starts at sample `consumed` (token ids
    checked against the vocabulary)."""
    c, d = run.config, run.derived
    batches = microbatches(dataset, consumed, d.num_microbatches, c.training.micro_batch_size, c.model.seq_length,
                           run.groups, run.device, keep_position_ids=c.data.reset_position_ids)
    for b in batches:
        check_token_ids(b, c)
    return batches


SCHEDULER_FIELDS = ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters",
                    "lr_wsd_decay_iters", "train_iters")
"""The flags that shape the learning-rate schedule: a resumed run must keep them (or say
--override-opt-param-scheduler)."""


def check_scheduler(saved: dict | None, run: Run) -> None:
    """Refuse to resume with another learning-rate schedule, naming both values, unless overridden."""
    t = run.config.training
    if saved is None or t.override_opt_param_scheduler:
        return
    current = {k: getattr(t, k) for k in SCHEDULER_FIELDS}
    differs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)}, this run {v}"
               for k, v in current.items() if saved.get(k) != v]
    if differs:
        raise ConfigError("resuming with another learning-rate schedule (the LR would jump):\n  - "
                          + "\n  - ".join(differs) + "\nkeep the checkpoint's values, or pass "
                          "--override-opt-param-scheduler to use this run's")


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
        "scheduler": {k: getattr(run.config.training, k) for k in SCHEDULER_FIELDS},
    }


def validation_loss(run: Run, dataset, interval_index: int) -> float:
    """Mean loss per token over --eval-iters global batches of the validation set (the k-th pass reads the k-th
    block of them)."""
    t, gbs = run.config.training, run.derived.global_batch_size
    start = interval_index * t.eval_iters * gbs
    batches = [b for k in range(t.eval_iters) for b in global_batch(run, dataset, start + k * gbs)]
    return evaluate(run, batches)


def check_finite(run: Run, iteration: int, grad_norm: float | None, skipped: bool, consecutive_skips: int) -> None:
    """Stop the run on a non-finite gradient norm (fp32/bf16; reduced over every rank, so all stop together) or on
    too many consecutive fp16 skips; nothing is saved of the poisoned state."""
    t = run.config.training
    if t.fp16:
        if consecutive_skips > t.fp16_max_skipped_steps:
            raise TrainingError(f"iteration {iteration}: {consecutive_skips} consecutive steps skipped for inf/NaN "
                                f"gradients (loss scale {run.optimizer.loss_scale}); the run stops here. Lower --lr "
                                f"or raise --fp16-max-skipped-steps {t.fp16_max_skipped_steps}.")
    elif skipped and not t.no_check_for_nan_in_loss_and_grad:
        raise TrainingError(f"iteration {iteration}: the gradient norm is {grad_norm} (the loss or the gradients are "
                            "not finite); the run stops here and nothing of this step is saved. Lower --lr, check "
                            "the data, or pass --no-check-for-nan-in-loss-and-grad to skip such steps.")


def save(run: Run, state: TrainState, log: Logger) -> Path:
    """A checkpoint of `state` under --save, and a log line with where, how long and how large."""
    start = time.perf_counter()
    directory = save_checkpoint(run.config.training.save, state, run, checkpoint_meta(run))
    size = sum(f.stat().st_size for f in directory.iterdir())
    log.line(f" saved checkpoint {directory} in {time.perf_counter() - start:.2f} s ({size / 2**20:.1f} MiB)")
    return directory


def out_of_time(run: Run, started: float) -> bool:
    """--exit-duration-in-mins has passed on some rank (all ranks agree: one all-reduce)."""
    late = torch.tensor([float(time.perf_counter() - started > 60 * run.config.training.exit_duration_in_mins)])
    comm.all_reduce(late, dist.group.WORLD, op=dist.ReduceOp.MAX)
    return bool(late.item())


class StepProfiler:
    """--profile: torch.profiler over iterations --profile-step-start..--profile-step-end, written as a Chrome trace
    per rank to --tensorboard-dir (else the working directory)."""

    def __init__(self, run: Run, log: Logger):
        self.run, self.log, self.profiler = run, log, None

    def before(self, iteration: int) -> None:
        t = self.run.config.training
        if t.profile and iteration == t.profile_step_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.run.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def after(self, iteration: int) -> None:
        t = self.run.config.training
        if self.profiler is not None and iteration >= t.profile_step_end:
            self.profiler.__exit__(None, None, None)
            name = f"profile-iter{t.profile_step_start}-{iteration}-rank{dist.get_rank()}.json"
            path = Path(t.tensorboard_dir or ".") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(path))
            self.log.line(f" profiled iterations {t.profile_step_start}..{iteration}: {path}")
            self.profiler = None


def train(run: Run, train_ds, valid_ds, state: TrainState, log: Logger) -> TrainState:
    """The loop from `state.iteration` to --train-iters; returns the final state."""
    t = run.config.training
    started = time.perf_counter()
    profiler = StepProfiler(run, log)
    schedule = schedule_from_config(t, run.derived.train_iters)
    tokens_per_step = run.derived.global_batch_size * run.config.model.seq_length
    flops_per_step, peak = step_flops(run.config).model, device_peak_tflops(t.peak_tflops, run.device)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    consecutive_skips = 0
    data = Prefetcher(lambda consumed: global_batch(run, train_ds, consumed), run.derived.global_batch_size,
                      enabled=not run.config.data.no_data_prefetch)
    with contextlib.closing(data):
        while state.iteration < run.derived.train_iters:
            profiler.before(state.iteration + 1)
            batches = data.get(state.consumed_samples, prefetch_next=state.iteration + 1 < run.derived.train_iters)
            run.reducer.zero_grad()
            result = forward_backward(run, batches)
            lr = schedule(state.iteration)
            grad_norm, skipped = optimizer_step(run, lr)
            state.iteration += 1
            state.consumed_samples += run.derived.global_batch_size
            state.skipped_steps += int(skipped)
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            check_finite(run, state.iteration, grad_norm, skipped, consecutive_skips)
            if skipped:
                scale = f" (loss scale now {run.optimizer.loss_scale:.1f})" if run.config.training.fp16 else ""
                log.line(f" iteration {state.iteration:8d} | skipped: inf/NaN gradients{scale}")
            else:
                window_loss += result.loss
                window_steps += 1
            if state.iteration % t.log_interval == 0 or state.iteration == run.derived.train_iters:
                elapsed = time.perf_counter() - window_start
                steps = t.log_interval if state.iteration % t.log_interval == 0 else state.iteration % t.log_interval
                mean_loss = window_loss / window_steps if window_steps else float("nan")
                extra = f" | bubble per stage {bubbles(run, result.bubble)}" if run.groups.size("pp") > 1 else ""
                if run.device.type == "cuda":
                    extra += f" | max memory {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB"
                extra += aux_loss_summary(run.context.aux_losses.pop())
                flops_text, flops_scalars = throughput_summary(flops_per_step * steps, elapsed,
                                                               run.derived.world_size, peak)
                waited = data.take_waited()
                eta = duration((run.derived.train_iters - state.iteration) * elapsed / steps)
                log.line(
                    f" iteration {state.iteration:8d}/{run.derived.train_iters} | consumed samples "
                    f"{state.consumed_samples:10d} | lr {lr:.3e} | loss "
                    f"{f'{mean_loss:.6e}' if window_steps else 'n/a (every step skipped)'} | grad norm "
                    f"{grad_norm if grad_norm is not None else float('nan'):.3f} | tokens/s "
                    f"{tokens_per_step * steps / elapsed:10.1f} | "
                    f"ms/step {1000 * elapsed / steps:8.1f}{flops_text} | data wait {100 * waited / elapsed:.1f}% | "
                    f"skipped {state.skipped_steps} | ETA {eta}{extra}"
                )
                if window_steps:
                    log.last_loss = mean_loss
                log.scalars(state.iteration, {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm or float("nan"),
                                              "data_wait_share": waited / elapsed, **flops_scalars})
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if t.eval_interval and valid_ds is not None and state.iteration % t.eval_interval == 0:
                val = validation_loss(run, valid_ds, state.iteration // t.eval_interval - 1)
                log.line(f" validation at iteration {state.iteration} | loss {val:.4f} | perplexity "
                         f"{math.exp(min(val, 50)):.2f}")
                log.scalars(state.iteration, {"val_loss": val})
                log.last_val_loss = val
            if t.save and t.save_interval and state.iteration % t.save_interval == 0:
                save(run, state, log)
            profiler.after(state.iteration)
            if t.exit_interval and state.iteration % t.exit_interval == 0:
                break
            if t.exit_duration_in_mins and out_of_time(run, started):
                log.line(f" --exit-duration-in-mins {t.exit_duration_in_mins} reached at iteration "
                         f"{state.iteration}")
                break
    return state


