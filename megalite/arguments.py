"""Megatron-style command line -> `MegaliteConfig`, validation rules and derived ("auto-calculated") values.

Flags are generated from the config dataclasses: field `tensor_model_parallel_size` is the flag
`--tensor-model-parallel-size` and its attribute docstring is the help text. `resolve` checks every rule before any
process group or file exists and computes the values that follow from the others.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Callable, Literal

from megalite.config import SECTIONS, MegaliteConfig, field_docs

DEFAULT_TRAIN_ITERS = 200
"""Optimizer steps when none of --train-iters, --train-samples, --train-epochs is given."""


class ConfigError(ValueError):
    """An invalid combination of flags; the message names the flags and the fix."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: object) -> object:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_field(group: argparse._ArgumentGroup, name: str, tp: object, doc: str, default: object) -> None:
    tp = _unwrap_optional(tp)
    flag = flag_name(name)
    doc = doc.replace("%", "%%")
    if default is not None and default is not False:
        doc += f" (default: {default})"
    if tp is bool:
        group.add_argument(flag, action="store_true", default=None, help=doc)
    elif typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        group.add_argument(flag, choices=choices, type=type(choices[0]), default=None, help=doc)
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        group.add_argument(flag, nargs="+", type=item, default=None, help=doc)
    elif tp in (int, float, str):
        group.add_argument(flag, type=tp, default=None, help=doc)
    else:
        raise TypeError(f"config field {name}: unsupported type {tp!r}")


def build_parser(prog: str = "megalite train") -> argparse.ArgumentParser:
    """The argument parser of `megalite train`: one flag per config field, grouped by section."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pretrain a GPT model. Derived values are computed, checked and printed at start-up.",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, cls.__doc__)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            _add_field(group, f.name, hints[f.name], docs[f.name], getattr(defaults, f.name))
    return parser


def config_from_namespace(ns: argparse.Namespace) -> MegaliteConfig:
    """Build a config from parsed flags: flags that were not given keep the dataclass defaults."""
    sections = {}
    for section, cls in SECTIONS.items():
        given = {
            f.name: getattr(ns, f.name)
            for f in dataclasses.fields(cls)
            if getattr(ns, f.name, None) is not None
        }
        sections[section] = cls(**given)
    return MegaliteConfig(**sections)


def parse_args(argv: list[str] | None = None) -> MegaliteConfig:
    return config_from_namespace(build_parser().parse_args(argv))


def to_argv(config: MegaliteConfig) -> list[str]:
    """The flags that reproduce `config` (fields that differ from the defaults)."""
    argv: list[str] = []
    for section, cls in SECTIONS.items():
        default = cls()
        current = getattr(config, section)
        for f in dataclasses.fields(cls):
            value = getattr(current, f.name)
            if value == getattr(default, f.name) or value is None:
                continue
            if value is True:
                argv.append(flag_name(f.name))
            elif isinstance(value, list):
                argv += [flag_name(f.name), *map(str, value)]
            else:
                argv += [flag_name(f.name), str(value)]
    return argv


# --------------------------------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Derived:
    """Values that follow from the flags and the world size."""

    world_size: int
    data_parallel_size: int
    expert_tensor_parallel_size: int
    expert_data_parallel_size: int
    num_query_groups: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: int | None
    global_batch_size: int
    num_microbatches: int
    virtual_pipeline_size: int
    train_iters: int | None
    train_samples: int | None

    def table(self) -> str:
        """The derived values as a printable table."""
        rows = [
            ("world size", self.world_size),
            ("data-parallel size (DP)", self.data_parallel_size),
            ("expert tensor-parallel size (ETP)", self.expert_tensor_parallel_size),
            ("expert data-parallel size (EDP)", self.expert_data_parallel_size),
            ("query groups", self.num_query_groups),
            ("ffn hidden size", self.ffn_hidden_size),
            ("expert ffn hidden size", self.moe_ffn_hidden_size),
            ("global batch size", self.global_batch_size),
            ("microbatches per step", self.num_microbatches),
            ("virtual pipeline size", self.virtual_pipeline_size),
            ("train iterations", self.train_iters if self.train_iters is not None else "from epochs"),
            ("train samples", self.train_samples if self.train_samples is not None else "from epochs"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = ["derived values", "-" * (width + 14)]
        lines += [f"{name:<{width}}  {value}" for name, value in rows if value is not None]
        return "\n".join(lines)


def _default_ffn_hidden_size(hidden: int, swiglu: bool) -> int:
    if not swiglu:
        return 4 * hidden
    return math.ceil(8 * hidden / 3 / 64) * 64


def _split_weights(data_path: list[str]) -> list[tuple[float, str]] | None:
    """'P' or 'W1 P1 W2 P2 ...' -> weighted prefixes; None if malformed."""
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        return None
    try:
        return [(float(w), p) for w, p in zip(data_path[::2], data_path[1::2])]
    except ValueError:
        return None


def _fill_defaults(c: MegaliteConfig, world_size: int) -> tuple[int, int, int, int, int, int | None]:
    """The defaults that depend on other flags: (dp, etp, edp, query groups, ffn hidden, expert ffn hidden)."""
    p, m = c.parallel, c.model
    dp = world_size // max(1, p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size)
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    edp = world_size // max(1, etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size)
    groups = m.num_query_groups or m.num_attention_heads
    ffn = m.ffn_hidden_size or _default_ffn_hidden_size(m.hidden_size, m.swiglu)
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
    ffn = c.model.ffn_hidden_size or _default_ffn_hidden_size(c.model.hidden_size, c.model.swiglu)
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
    ffn = c.model.moe_ffn_hidden_size or c.model.ffn_hidden_size or _default_ffn_hidden_size(
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
    dp = _fill_defaults(c, world)[0]
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
    dp = _fill_defaults(c, world)[0]
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
    dp = _fill_defaults(c, world)[0]
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
    weighted = _split_weights(d.data_path)
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


def resolve(c: MegaliteConfig, world_size: int) -> tuple[MegaliteConfig, Derived]:
    """Validate `c` for `world_size` ranks, then return it with defaults filled in, and the derived values."""
    validate(c, world_size)
    p, m, t = c.parallel, c.model, c.training
    dp, etp, edp, groups, ffn, moe_ffn = _fill_defaults(c, world_size)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    vpp = 1
    if p.num_layers_per_virtual_pipeline_stage:
        vpp = m.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)
    elif p.pipeline_schedule == "zb-v":
        vpp = 2

    iters = t.train_iters if t.train_iters not in (None, -1) else None
    samples = t.train_samples if t.train_samples not in (None, -1) else None
    if iters is None and samples is None and t.train_epochs in (None, -1):
        iters = DEFAULT_TRAIN_ITERS
    if iters is not None:
        samples = iters * gbs
    elif samples is not None:
        iters = samples // gbs

    filled = MegaliteConfig(
        parallel=dataclasses.replace(p, expert_tensor_parallel_size=etp),
        model=dataclasses.replace(m, num_query_groups=groups, ffn_hidden_size=ffn, moe_ffn_hidden_size=moe_ffn),
        training=dataclasses.replace(t, global_batch_size=gbs, train_iters=iters, train_samples=samples),
        data=c.data,
    )
    derived = Derived(
        world_size=world_size,
        data_parallel_size=dp,
        expert_tensor_parallel_size=etp,
        expert_data_parallel_size=edp,
        num_query_groups=groups,
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=moe_ffn,
        global_batch_size=gbs,
        num_microbatches=gbs // (t.micro_batch_size * dp),
        virtual_pipeline_size=vpp,
        train_iters=iters,
        train_samples=samples,
    )
    return filled, derived


def derive_train_length_from_epochs(c: MegaliteConfig, samples_per_epoch: int) -> tuple[MegaliteConfig, int]:
    """With --train-epochs: train iterations = floor(epochs x samples per epoch / global batch)."""
    t = c.training
    assert t.train_epochs not in (None, -1) and t.global_batch_size
    iters = int(t.train_epochs * samples_per_epoch) // t.global_batch_size
    if iters < 1:
        raise ConfigError(
            f"--train-epochs {t.train_epochs} over {samples_per_epoch} samples per epoch is less than one "
            f"global batch of {t.global_batch_size}; train longer or lower --global-batch-size."
        )
    training = dataclasses.replace(t, train_iters=iters, train_samples=iters * t.global_batch_size)
    return dataclasses.replace(c, training=training), iters


def weighted_data_paths(data_path: list[str]) -> list[tuple[float, str]]:
    """Normalised (weight, prefix) pairs of a validated --data-path."""
    pairs = _split_weights(data_path)
    assert pairs is not None, "validate() rejects malformed --data-path"
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]
