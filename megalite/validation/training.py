"""Rules on training and data: batch sizes, precision, training length, learning rates, checkpoints, the data
blend and split, and the tokenizer."""
from __future__ import annotations

import math

from megalite.config import MegaliteConfig
from megalite.validation.core import Defaults


def split_weights(data_path: list[str]) -> list[tuple[float, str]] | None:
    """'P' or 'W1 P1 W2 P2 ...' -> weighted prefixes; None if malformed."""
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        return None
    try:
        return [(float(w), p) for w, p in zip(data_path[::2], data_path[1::2])]
    except ValueError:
        return None


def micro_batch_positive(c: MegaliteConfig, d: Defaults) -> str | None:
    if c.training.micro_batch_size < 1:
        return f"--micro-batch-size {c.training.micro_batch_size} must be at least 1."
    return None


def global_batch_divisible(c: MegaliteConfig, d: Defaults) -> str | None:
    t, dp = c.training, d.data_parallel_size
    if t.global_batch_size is None or dp < 1 or t.micro_batch_size < 1:
        return None
    unit = t.micro_batch_size * dp
    if t.global_batch_size < 1 or t.global_batch_size % unit:
        return (
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp} = {unit}; use a multiple of {unit}."
        )
    return None


def interleaving_microbatches(c: MegaliteConfig, d: Defaults) -> str | None:
    p, t = c.parallel, c.training
    if p.pipeline_schedule != "interleaved" or p.pipeline_model_parallel_size < 2:
        return None
    if d.data_parallel_size < 1 or t.micro_batch_size < 1:
        return None
    m = d.num_microbatches
    if m % p.pipeline_model_parallel_size:
        return (
            f"interleaved 1F1B needs the number of microbatches ({m}) to be a multiple of "
            f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}; raise --global-batch-size."
        )
    return None


def one_precision(c: MegaliteConfig, d: Defaults) -> str | None:
    if c.training.bf16 and c.training.fp16:
        return "--bf16 and --fp16 are both set; choose one."
    return None


def one_training_length(c: MegaliteConfig, d: Defaults) -> str | None:
    t = c.training
    given = [
        flag
        for flag, v in [("--train-iters", t.train_iters), ("--train-samples", t.train_samples),
                        ("--train-epochs", t.train_epochs)]
        if v is not None and v != -1
    ]
    if len(given) > 1:
        return f"{' and '.join(given)} are both set; give one and set the others to -1 (derived)."
    bad = [
        flag
        for flag, v in [("--train-iters", t.train_iters), ("--train-samples", t.train_samples),
                        ("--train-epochs", t.train_epochs)]
        if v is not None and v != -1 and v <= 0
    ]
    if bad:
        return f"{bad[0]} must be positive, or -1 to derive it."
    return None


def train_samples_hold_a_batch(c: MegaliteConfig, d: Defaults) -> str | None:
    samples, gbs = c.training.train_samples, d.global_batch_size
    if samples not in (None, -1) and 0 < samples < gbs:
        return f"--train-samples {samples} is less than one global batch of {gbs}; train longer."
    return None


def learning_rates_ordered(c: MegaliteConfig, d: Defaults) -> str | None:
    t = c.training
    for name, value in (("--lr", t.lr), ("--min-lr", t.min_lr)):
        if not math.isfinite(value) or value < 0:
            return f"{name} {value} must be a finite number of at least 0."
    if t.min_lr > t.lr:
        return f"--min-lr {t.min_lr} must not exceed --lr {t.lr}."
    return None


def intervals_positive(c: MegaliteConfig, d: Defaults) -> str | None:
    t = c.training
    bad = [f"{flag} {v}" for flag, v in [("--log-interval", t.log_interval), ("--eval-interval", t.eval_interval),
                                         ("--eval-iters", t.eval_iters), ("--exit-interval", t.exit_interval)]
           if v is not None and v < 1]
    return f"{', '.join(bad)}: intervals and counts must be at least 1 (leave a flag out to disable it)." if bad else None


def clip_grad_not_negative(c: MegaliteConfig, d: Defaults) -> str | None:
    clip = c.training.clip_grad
    if not math.isfinite(clip) or clip < 0:
        return f"--clip-grad {clip} must be at least 0 (0 disables clipping)."
    return None


def warmup_within_decay(c: MegaliteConfig, d: Defaults) -> str | None:
    t = c.training
    if t.lr_warmup_fraction is not None and not 0.0 <= t.lr_warmup_fraction <= 1.0:
        return f"--lr-warmup-fraction {t.lr_warmup_fraction} must be in [0, 1]."
    if t.lr_decay_iters is not None and t.lr_warmup_iters > t.lr_decay_iters:
        return f"--lr-warmup-iters {t.lr_warmup_iters} exceeds --lr-decay-iters {t.lr_decay_iters}."
    return None


def save_interval_needs_save(c: MegaliteConfig, d: Defaults) -> str | None:
    t = c.training
    if t.save_interval is not None and (t.save is None or t.save_interval < 1):
        return "--save-interval needs --save DIR and a positive interval."
    return None


def data_path_well_formed(c: MegaliteConfig, d: Defaults) -> str | None:
    data = c.data
    if data.data_path is None or c.sft.sft:  # conversation files: `sft_data_given`
        return None
    weighted = split_weights(data.data_path)
    if weighted is None or any(w < 0 for w, _ in weighted) or sum(w for w, _ in weighted) <= 0:
        return (
            f"--data-path {' '.join(data.data_path)}: give one prefix, or pairs 'WEIGHT PREFIX' with non-negative "
            "weights that sum above 0."
        )
    if data.mock_data:
        return "--data-path and --mock-data are both set; choose one."
    return None


def split_well_formed(c: MegaliteConfig, d: Defaults) -> str | None:
    parts = c.data.split.strip("'\"").replace("/", ",").split(",")  # quotes a shell script left in
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        return f"--split {c.data.split!r}: give up to three non-negative numbers, e.g. 969,30,1."
    return None


def tokenizer_model_given(c: MegaliteConfig, d: Defaults) -> str | None:
    data = c.data
    if data.tokenizer_type == "HuggingFaceTokenizer" and not data.tokenizer_model:
        return "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH/tokenizer.json."
    return None


def sft_data_given(c: MegaliteConfig, d: Defaults) -> str | None:
    if not c.sft.sft:
        return None
    if not c.data.data_path or c.data.mock_data:
        return "--sft needs --data-path FILE.jsonl [FILE.jsonl ...] (conversation files), not --mock-data."
    numbers = [p for p in c.data.data_path if p.replace(".", "", 1).isdigit()]
    if numbers:
        return f"--sft --data-path: weights ({' '.join(numbers)}) are not supported; give the conversation files only."
    return None


def document_masks_supported(c: MegaliteConfig, d: Defaults) -> str | None:
    if c.data.reset_attention_mask and c.model.attention_backend == "te":
        return ("--reset-attention-mask is not supported with --attention-backend te; use flash, sdpa, eager or "
                "auto.")
    return None
