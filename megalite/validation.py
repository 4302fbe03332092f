"""Validation rules: every invalid combination of flags is rejected before any process group or file exists,
with a message that names the flags and the fix. Each rule is a small function registered with `@rule`."""
from __future__ import annotations

import math
from typing import Callable

from megalite.config import MegaliteConfig


class ConfigError(ValueError):
    """An invalid combination of flags; the message names the flags and the fix."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def default_ffn_hidden_size(hidden: int, swiglu: bool) -> int:
    if not swiglu:
        return 4 * hidden
    return math.ceil(8 * hidden / 3 / 64) * 64


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


def fill_defaults(c: MegaliteConfig, world_size: int) -> tuple[int, int, int, int, int, int | None]:
    """The defaults that depend on other flags: (dp, etp, edp, query groups, ffn hidden, expert ffn hidden)."""
    p, m = c.parallel, c.model
    dp = world_size // max(1, p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size)
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    edp = world_size // max(1, etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size)
    groups = m.num_query_groups or m.num_attention_heads
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.swiglu)
    moe_ffn = (m.moe_ffn_hidden_size or ffn) if m.num_experts else None
    return dp, etp, edp, groups, ffn, moe_ffn


Rule = Callable[[MegaliteConfig, int], "str | None"]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    """Register a validation rule: it returns an error message naming the flags and the fix, or None."""
    RULES.append(fn)
    return fn


def _sizes(c: MegaliteConfig) -> dict[str, int]:
    p = c.parallel
    return {
        "--tensor-model-parallel-size": p.tensor_model_parallel_size,
        "--context-parallel-size": p.context_parallel_size,
        "--pipeline-model-parallel-size": p.pipeline_model_parallel_size,
        "--expert-model-parallel-size": p.expert_model_parallel_size,
        "--expert-tensor-parallel-size": p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
    }


@rule
def positive_parallel_sizes(c: MegaliteConfig, world: int) -> str | None:
    bad = [f"{k} {v}" for k, v in _sizes(c).items() if v < 1]
    return f"{', '.join(bad)}: parallel sizes must be at least 1." if bad else None


@rule
def world_divides_dense_grid(c: MegaliteConfig, world: int) -> str | None:
    p = c.parallel
    if min(_sizes(c).values()) < 1:
        return None
    grid = p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
    if world % grid:
        return (
            f"world size {world} is not divisible by --tensor-model-parallel-size {p.tensor_model_parallel_size} x "
            f"--context-parallel-size {p.context_parallel_size} x --pipeline-model-parallel-size "
            f"{p.pipeline_model_parallel_size} = {grid}; change the sizes or the number of processes."
        )
    return None


@rule
def world_divides_expert_grid(c: MegaliteConfig, world: int) -> str | None:
    p = c.parallel
    if min(_sizes(c).values()) < 1:
        return None
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    grid = etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size
    if world % grid:
        return (
            f"world size {world} is not divisible by --expert-tensor-parallel-size {etp} x "
            f"--expert-model-parallel-size {p.expert_model_parallel_size} x --pipeline-model-parallel-size "
            f"{p.pipeline_model_parallel_size} = {grid}; change the expert sizes or the number of processes."
        )
    return None


@rule
def rank_order_is_a_permutation(c: MegaliteConfig, world: int) -> str | None:
    from megalite.parallel_state import parse_order

    try:
        parse_order(c.parallel.rank_order)
    except ValueError as e:
        return f"--rank-order {c.parallel.rank_order!r}: {e}"
    return None


@rule
def heads_divisible_by_tp(c: MegaliteConfig, world: int) -> str | None:
    tp, heads = c.parallel.tensor_model_parallel_size, c.model.num_attention_heads
    if tp >= 1 and heads % tp:
        return (
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}; "
            "each TP rank needs whole heads."
        )
    return None


@rule
def query_groups_divisible_by_tp(c: MegaliteConfig, world: int) -> str | None:
    tp, groups = c.parallel.tensor_model_parallel_size, c.model.num_query_groups
    if groups and tp >= 1 and groups % tp:
        return (
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}; "
            "each TP rank needs whole key/value groups."
        )
    return None


@rule
def heads_divisible_by_query_groups(c: MegaliteConfig, world: int) -> str | None:
    heads, groups = c.model.num_attention_heads, c.model.num_query_groups
    if groups is not None and (groups < 1 or heads % groups):
        return f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; pick a divisor."
    return None


@rule
def hidden_divisible_by_heads(c: MegaliteConfig, world: int) -> str | None:
    h, heads = c.model.hidden_size, c.model.num_attention_heads
    if heads < 1 or h % heads:
        return f"--hidden-size {h} is not divisible by --num-attention-heads {heads}."
    return None


@rule
def head_dim_even_for_rotary(c: MegaliteConfig, world: int) -> str | None:
    h, heads = c.model.hidden_size, c.model.num_attention_heads
    if heads >= 1 and h % heads == 0 and (h // heads) % 2:
        return (
            f"head size --hidden-size {h} / --num-attention-heads {heads} = {h // heads} is odd; "
            "rotary embeddings need an even head size."
        )
    return None


@rule
def ffn_divisible_by_tp(c: MegaliteConfig, world: int) -> str | None:
    tp = c.parallel.tensor_model_parallel_size
    ffn = c.model.ffn_hidden_size or default_ffn_hidden_size(c.model.hidden_size, c.model.swiglu)
    if tp >= 1 and ffn % tp:
        return f"--ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size {tp}."
    return None


@rule
def experts_needed_for_ep(c: MegaliteConfig, world: int) -> str | None:
    ep = c.parallel.expert_model_parallel_size
    if ep > 1 and not c.model.num_experts:
        return f"--expert-model-parallel-size {ep} needs an MoE model: set --num-experts."
    return None


@rule
def experts_divisible_by_ep(c: MegaliteConfig, world: int) -> str | None:
    ep, experts = c.parallel.expert_model_parallel_size, c.model.num_experts
    if experts and ep >= 1 and experts % ep:
        return (
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}; "
            "each EP rank holds the same number of experts."
        )
    return None


@rule
def topk_at_most_experts(c: MegaliteConfig, world: int) -> str | None:
    k, experts = c.model.moe_router_topk, c.model.num_experts
    if experts and not 1 <= k <= experts:
        return f"--moe-router-topk {k} must be between 1 and --num-experts {experts}."
    return None


@rule
def expert_ffn_divisible_by_etp(c: MegaliteConfig, world: int) -> str | None:
    if not c.model.num_experts:
        return None
    etp = c.parallel.expert_tensor_parallel_size or c.parallel.tensor_model_parallel_size
    ffn = c.model.moe_ffn_hidden_size or c.model.ffn_hidden_size or default_ffn_hidden_size(
        c.model.hidden_size, c.model.swiglu
    )
    if etp >= 1 and ffn % etp:
        return f"--moe-ffn-hidden-size {ffn} is not divisible by --expert-tensor-parallel-size {etp}."
    return None


@rule
def shared_expert_divisible_by_tp(c: MegaliteConfig, world: int) -> str | None:
    size, tp = c.model.moe_shared_expert_intermediate_size, c.parallel.tensor_model_parallel_size
    if size and tp >= 1 and size % tp:
        return f"--moe-shared-expert-intermediate-size {size} is not divisible by --tensor-model-parallel-size {tp}."
    return None


@rule
def moe_layer_freq_positive(c: MegaliteConfig, world: int) -> str | None:
    if c.model.moe_layer_freq < 1:
        return f"--moe-layer-freq {c.model.moe_layer_freq} must be at least 1."
    return None


@rule
def layers_divisible_by_pp(c: MegaliteConfig, world: int) -> str | None:
    layers, pp = c.model.num_layers, c.parallel.pipeline_model_parallel_size
    if layers < 1:
        return f"--num-layers {layers} must be at least 1."
    if pp >= 1 and layers % pp:
        return (
            f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp}; "
            "every stage holds the same number of layers."
        )
    return None


@rule
def interleaving_flags_agree(c: MegaliteConfig, world: int) -> str | None:
    p = c.parallel
    per_stage = p.num_layers_per_virtual_pipeline_stage
    if p.pipeline_schedule == "interleaved" and per_stage is None:
        return "--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage."
    if per_stage is not None and p.pipeline_schedule != "interleaved":
        return (
            f"--num-layers-per-virtual-pipeline-stage is set but --pipeline-schedule is {p.pipeline_schedule}; "
            "add --pipeline-schedule interleaved or drop the flag."
        )
    return None


@rule
def interleaving_needs_pipeline(c: MegaliteConfig, world: int) -> str | None:
    p = c.parallel
    if p.pipeline_schedule in ("interleaved", "zb-v") and p.pipeline_model_parallel_size < 2:
        return f"--pipeline-schedule {p.pipeline_schedule} needs --pipeline-model-parallel-size of at least 2."
    return None


@rule
def virtual_stages_divide_layers(c: MegaliteConfig, world: int) -> str | None:
    p, layers = c.parallel, c.model.num_layers
    per_stage = p.num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return None
    pp = max(1, p.pipeline_model_parallel_size)
    if per_stage < 1 or layers % (pp * per_stage):
        return (
            f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp} x "
            f"--num-layers-per-virtual-pipeline-stage {per_stage}."
        )
    if layers // (pp * per_stage) < 2:
        return (
            f"--num-layers-per-virtual-pipeline-stage {per_stage} gives one chunk per stage; "
            "lower it for interleaving, or use --pipeline-schedule 1f1b."
        )
    return None


@rule
def zero_bubble_v_needs_two_chunks(c: MegaliteConfig, world: int) -> str | None:
    p, layers = c.parallel, c.model.num_layers
    pp = max(1, p.pipeline_model_parallel_size)
    if p.pipeline_schedule == "zb-v" and layers % (2 * pp):
        return (
            f"--pipeline-schedule zb-v puts two chunks on each stage: --num-layers {layers} must be divisible by "
            f"2 x --pipeline-model-parallel-size {pp}."
        )
    return None


@rule
def sequence_divisible_for_cp(c: MegaliteConfig, world: int) -> str | None:
    cp, s = c.parallel.context_parallel_size, c.model.seq_length
    if cp > 1 and s % (2 * cp):
        return (
            f"--seq-length {s} is not divisible by 2 x --context-parallel-size {cp}; "
            "context parallelism cuts the sequence into 2 x CP chunks."
        )
    return None


@rule
def sequence_parallel_needs_tp(c: MegaliteConfig, world: int) -> str | None:
    if c.parallel.sequence_parallel and c.parallel.tensor_model_parallel_size == 1:
        return "--sequence-parallel needs --tensor-model-parallel-size above 1; drop --sequence-parallel."
    return None


@rule
def sequence_divisible_for_sp(c: MegaliteConfig, world: int) -> str | None:
    p, s = c.parallel, c.model.seq_length
    cp, tp = max(1, p.context_parallel_size), max(1, p.tensor_model_parallel_size)
    if p.sequence_parallel and s % (cp * tp):
        return (
            f"--seq-length {s} is not divisible by --context-parallel-size {cp} x --tensor-model-parallel-size "
            f"{tp}; sequence parallelism splits each context-parallel shard over the TP ranks."
        )
    return None


@rule
def positive_shapes(c: MegaliteConfig, world: int) -> str | None:
    m = c.model
    bad = [
        f"{flag_name(n)} {v}"
        for n, v in [("hidden_size", m.hidden_size), ("num_attention_heads", m.num_attention_heads),
                     ("seq_length", m.seq_length)]
        if v < 1
    ]
    return f"{', '.join(bad)}: must be at least 1." if bad else None


@rule
def dropout_is_a_probability(c: MegaliteConfig, world: int) -> str | None:
    m = c.model
    for name in ("hidden_dropout", "attention_dropout"):
        v = getattr(m, name)
        if not 0.0 <= v < 1.0:
            return f"{flag_name(name)} {v} must be in [0, 1)."
    return None


@rule
def micro_batch_positive(c: MegaliteConfig, world: int) -> str | None:
    if c.training.micro_batch_size < 1:
        return f"--micro-batch-size {c.training.micro_batch_size} must be at least 1."
    return None


@rule
def global_batch_divisible(c: MegaliteConfig, world: int) -> str | None:
    t = c.training
    dp = fill_defaults(c, world)[0]
    if t.global_batch_size is None or dp < 1 or t.micro_batch_size < 1:
        return None
    unit = t.micro_batch_size * dp
    if t.global_batch_size < 1 or t.global_batch_size % unit:
        return (
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp} = {unit}; use a multiple of {unit}."
        )
    return None


@rule
def interleaving_microbatches(c: MegaliteConfig, world: int) -> str | None:
    p, t = c.parallel, c.training
    if p.pipeline_schedule != "interleaved" or p.pipeline_model_parallel_size < 2:
        return None
    dp = fill_defaults(c, world)[0]
    if dp < 1 or t.micro_batch_size < 1:
        return None
    gbs = t.global_batch_size or t.micro_batch_size * dp
    m = gbs // (t.micro_batch_size * dp)
    if m % p.pipeline_model_parallel_size:
        return (
            f"interleaved 1F1B needs the number of microbatches ({m}) to be a multiple of "
            f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}; raise --global-batch-size."
        )
    return None


@rule
def one_precision(c: MegaliteConfig, world: int) -> str | None:
    if c.training.bf16 and c.training.fp16:
        return "--bf16 and --fp16 are both set; choose one."
    return None


@rule
def one_training_length(c: MegaliteConfig, world: int) -> str | None:
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


@rule
def train_samples_divisible(c: MegaliteConfig, world: int) -> str | None:
    t = c.training
    dp = fill_defaults(c, world)[0]
    gbs = t.global_batch_size or t.micro_batch_size * max(dp, 1)
    if t.train_samples not in (None, -1) and t.train_samples > 0 and gbs > 0 and t.train_samples % gbs:
        return (
            f"--train-samples {t.train_samples} is not divisible by the global batch size {gbs}; "
            f"use a multiple of {gbs}."
        )
    return None


@rule
def learning_rates_ordered(c: MegaliteConfig, world: int) -> str | None:
    t = c.training
    if t.lr < 0 or t.min_lr < 0 or t.min_lr > t.lr:
        return f"--min-lr {t.min_lr} must be between 0 and --lr {t.lr}."
    return None


@rule
def warmup_within_decay(c: MegaliteConfig, world: int) -> str | None:
    t = c.training
    if t.lr_warmup_fraction is not None and not 0.0 <= t.lr_warmup_fraction <= 1.0:
        return f"--lr-warmup-fraction {t.lr_warmup_fraction} must be in [0, 1]."
    if t.lr_decay_iters is not None and t.lr_warmup_iters > t.lr_decay_iters:
        return f"--lr-warmup-iters {t.lr_warmup_iters} exceeds --lr-decay-iters {t.lr_decay_iters}."
    return None


@rule
def save_interval_needs_save(c: MegaliteConfig, world: int) -> str | None:
    t = c.training
    if t.save_interval is not None and (t.save is None or t.save_interval < 1):
        return "--save-interval needs --save DIR and a positive interval."
    return None


@rule
def data_path_well_formed(c: MegaliteConfig, world: int) -> str | None:
    d = c.data
    if d.data_path is None:
        return None
    weighted = split_weights(d.data_path)
    if weighted is None or any(w < 0 for w, _ in weighted) or sum(w for w, _ in weighted) <= 0:
        return (
            f"--data-path {' '.join(d.data_path)}: give one prefix, or pairs 'WEIGHT PREFIX' with non-negative "
            "weights that sum above 0."
        )
    if d.mock_data:
        return "--data-path and --mock-data are both set; choose one."
    return None


@rule
def split_well_formed(c: MegaliteConfig, world: int) -> str | None:
    parts = c.data.split.replace("/", ",").split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        return f"--split {c.data.split!r}: give up to three non-negative numbers, e.g. 969,30,1."
    return None


@rule
def tokenizer_model_given(c: MegaliteConfig, world: int) -> str | None:
    d = c.data
    if d.tokenizer_type == "HuggingFaceTokenizer" and not d.tokenizer_model:
        return "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH/tokenizer.json."
    return None


def validate(c: MegaliteConfig, world_size: int) -> None:
    """Raise `ConfigError` listing every rule the config breaks."""
    errors = [msg for r in RULES if (msg := r(c, world_size))]
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
