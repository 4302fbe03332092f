"""`megalite train`: flags -> resolved config -> tokenizer, data, model, resume -> the training loop -> a summary.

The loop itself lives in `megalite.training`; everything a step does in `megalite.engine`. Start-up fails early
(`engine.checks`): a bad flag, an unwritable --save, a --load without a checkpoint, empty splits.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import (
    build_parser,
    config_from_namespace,
    derive_train_length_from_epochs,
    resolve,
)
from megalite.checkpoint import TrainState, load_checkpoint
from megalite.checkpoint.flags import model_flags_from_hf
from megalite.compat import no_effect
from megalite.config import MegaliteConfig
from megalite.distributed import init_distributed, launched_world_size
from megalite.engine.checks import check_splits, probe_save_dir, resume_source
from megalite.engine.log import Logger, configure_logging, duration
from megalite.engine.setup import rank_memory_estimate, setup, with_vocab_size
from megalite.training import check_scheduler, checkpoint_meta, save, train


def describe_data(config: MegaliteConfig, train_ds, valid_ds) -> str:
    """The data a run trains on, for the start-up log."""
    d, s = config.data, config.model.seq_length
    if config.sft.sft:
        lines = [f"data: --sft on {' '.join(d.data_path)}, {'one conversation per sample' if config.sft.no_pack else 'packed'}"
                 f" into samples of {s} tokens; tokenizer {d.tokenizer_model or d.tokenizer_type}"]
        lines += [f"  {ds.stats.line(name)}" for name, ds in (("train", train_ds), ("validation", valid_ds)) if ds]
        if not config.sft.no_pack and not d.reset_attention_mask:
            lines.append("  note: packed conversations attend to each other; --reset-attention-mask (and "
                         "--reset-position-ids) keep them apart")
        return "\n".join(lines)
    source = (f"--data-path {' '.join(d.data_path)}" if d.data_path else "--mock-data" if d.mock_data else
              "the embedded corpus (the interpreter's standard-library sources)")
    valid = f", validation {len(valid_ds)} samples" if valid_ds is not None else ""
    tokenizer = d.tokenizer_model or d.tokenizer_type
    return (f"data: {source}, tokenizer {tokenizer}; train {len(train_ds)} samples of {s} tokens{valid} "
            f"(--split {d.split})")


def resume(run, source: str, log: Logger) -> TrainState:
    """Load `source` (this run's own --save, or --load) as the flags say; returns the counters to go on from."""
    t = run.config.training
    own = source == t.save  # our own checkpoints: always the full state
    loaded = load_checkpoint(source, run, checkpoint_meta(run), load_optim=own or not t.no_load_optim,
                             load_rng=own or not t.no_load_rng, finetune=t.finetune and not own,
                             step=None if own else t.ckpt_step)
    if not (t.finetune and not own):
        check_scheduler(loaded.scheduler, run)
    log.line(f"resumed from {loaded.directory} at iteration {loaded.state.iteration}"
             + ("" if loaded.rng_restored or t.no_load_rng or t.finetune else
                " (saved under another layout, or a Hugging Face model: weights, and any optimizer state, counters "
                "and data position restored; dropout streams seeded from --seed)"))
    return loaded.state


def pretrain(config: MegaliteConfig) -> TrainState:
    """Initialise the processes, build everything from `config`, train, and log a summary."""
    from megalite.data import build_gpt_datasets, samples_per_epoch
    from megalite.data.tokenizers import build_tokenizer
    from megalite.sft.dataset import build_sft_datasets, sft_samples_per_epoch

    build_datasets, epoch_samples = ((build_sft_datasets, sft_samples_per_epoch) if config.sft.sft else
                                     (build_gpt_datasets, samples_per_epoch))

    started = time.perf_counter()
    init_distributed(config.parallel.distributed_backend, config.parallel.distributed_timeout_minutes)
    first_rank = configure_logging() if dist.get_rank() == 0 else None
    config, derived = resolve(config, dist.get_world_size())
    tokenizer = build_tokenizer(config.data, config.model.vocab_size)
    config = with_vocab_size(config, tokenizer.vocab_size)
    if derived.train_iters is None:
        config, iters = derive_train_length_from_epochs(config, epoch_samples(config, tokenizer))
        derived = dataclasses.replace(derived, train_iters=iters, train_samples=config.training.train_samples)
    if first_rank:
        first_rank.info(derived.table())
        first_rank.info(f"vocabulary: {config.model.vocab_size} tokens, padded to {config.model.padded_vocab_size}")
    t = config.training
    source, note = resume_source(t)
    probe_save_dir(t, dist.get_rank())
    run = setup(config, derived)
    eval_samples = 0
    if t.eval_interval:
        eval_samples = (derived.train_iters // t.eval_interval + 1) * t.eval_iters * derived.global_batch_size
    train_ds, valid_ds, _ = build_datasets(config, tokenizer, (derived.train_samples, eval_samples, 0))
    check_splits(config, train_ds, valid_ds)
    log = Logger(run)
    log.line(describe_data(config, train_ds, valid_ds))
    ignored = no_effect(config.megatron) + (["--sequence-parallel (TP is 1)"] if config.parallel.sequence_parallel
                                              and config.parallel.tensor_model_parallel_size == 1 else [])
    if ignored:
        log.line(f"accepted with no effect in megalite (see megalite train --help): {', '.join(ignored)}")
    if note:
        log.line(note)
    state = resume(run, source, log) if source is not None else TrainState()
    first = state.iteration
    log.line(f"model: {sum(p.numel() for p in run.model.parameters()):,} parameters on this rank; "
             f"layout {json.dumps(checkpoint_meta(run)['layout'])}")
    log.line(rank_memory_estimate(config, derived, run.chunks, run.schedule(), run.groups, run.device.type).line())
    state = train(run, train_ds, valid_ds, state, log)
    saved = None
    if t.save:
        last = Path(t.save) / f"iter_{state.iteration:07d}"
        saved = last if t.save_interval and state.iteration % t.save_interval == 0 else save(run, state, log)
    tokens = (state.iteration - first) * derived.global_batch_size * config.model.seq_length
    loss = f"{log.last_loss:.4f}" if log.last_loss is not None else "n/a"
    val = f", last validation loss {log.last_val_loss:.4f}" if log.last_val_loss is not None else ""
    log.line(f"run finished: iterations {first} -> {state.iteration}, {tokens:,} tokens in "
             f"{duration(time.perf_counter() - started)}; last train loss {loss}{val}; "
             + (f"checkpoint {saved}" if saved else "no checkpoint (--save not set)"))
    log.close()
    ps.destroy_model_parallel(run.groups)
    return state


def main(argv: list[str]) -> int:
    """`megalite train`: validate the flags, print the derived values and train."""
    ns = build_parser().parse_args(argv)
    from_hf = model_flags_from_hf(ns)
    config = config_from_namespace(ns)
    resolve(config, launched_world_size())
    if from_hf and int(os.environ.get("RANK", "0")) == 0:
        configure_logging().info(from_hf)
    owned = not dist.is_initialized()  # a caller's process group (tests, notebooks) stays theirs
    pretrain(config)
    if owned:
        dist.destroy_process_group()
    return 0
