"""Megatron-style command line -> `MegaliteConfig`, and the derived ("auto-calculated") values.

Flags are generated from the config dataclasses: field `tensor_model_parallel_size` is the flag
`--tensor-model-parallel-size` and its attribute docstring is the help text. `resolve` checks every rule of
`megalite.validation` before any process group or file exists and computes the values that follow from the others.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Literal

from megalite.config import SECTIONS, MegaliteConfig, field_docs
from megalite.parser import Parser
from megalite.validation import ConfigError, Defaults, flag_name, split_weights, validate

__all__ = ["ConfigError", "Derived", "build_parser", "config_from_namespace", "derive_train_length_from_epochs",
           "fill_fields", "parse_args", "resolve", "to_argv", "weighted_data_paths"]

MEGATRON_ATTENTION = {"fused": "te", "unfused": "eager", "local": "sdpa"}
"""Megatron's --attention-backend names and the megalite back-end each means."""

DEFAULT_TRAIN_ITERS = 200
"""Optimizer steps when none of --train-iters, --train-samples, --train-epochs is given."""


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
    parser = Parser(
        prog=prog,
        description="Pretrain a GPT model. Derived values are computed, checked and printed at start-up.",
    )
    for section, cls in SECTIONS.items():
        add_config_group(parser, section, cls)
    return parser


def add_config_group(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    """One flag per field of config dataclass `cls`, in an argument group named `section`."""
    group = parser.add_argument_group(section, cls.__doc__)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        _add_field(group, f.name, hints[f.name], docs[f.name], getattr(default, f.name))


def section_from_namespace(ns: argparse.Namespace, cls: type):
    """An instance of config dataclass `cls` from parsed flags (flags not given keep the defaults)."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None})


def config_from_namespace(ns: argparse.Namespace) -> MegaliteConfig:
    """Build a config from parsed flags: flags that were not given keep the dataclass defaults."""
    return MegaliteConfig(**{section: section_from_namespace(ns, cls) for section, cls in SECTIONS.items()})


def fill_fields(ns: argparse.Namespace, fields: dict[str, object], source: str) -> None:
    """Set `fields` (config field -> value) on parsed flags; a flag given with another value is an error naming
    both values and `source`."""
    contradictions = [f"{flag_name(name)} {getattr(ns, name)} (the command line) contradicts {value} ({source})"
                      for name, value in fields.items()
                      if getattr(ns, name, None) is not None and getattr(ns, name) != value]
    if contradictions:
        raise ConfigError("\n".join(contradictions) + "\ndrop the flags, or load another model")
    for name, value in fields.items():
        setattr(ns, name, value)


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
class Derived(Defaults):
    """Values that follow from the flags and the world size: the `Defaults` the rules were checked with, and the
    pipeline and training-length values."""

    virtual_pipeline_size: int
    train_iters: int | None
    train_samples: int | None
    notes: tuple[str, ...] = ()
    """What the flags were turned into, beyond the values above (printed with the table)."""

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
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def resolve(c: MegaliteConfig, world_size: int) -> tuple[MegaliteConfig, Derived]:
    """Validate `c` for `world_size` ranks, then return it with defaults filled in, and the derived values."""
    d = validate(c, world_size)
    p, m, t = c.parallel, c.model, c.training
    gbs = d.global_batch_size
    vpp = 1
    if p.num_layers_per_virtual_pipeline_stage:
        vpp = m.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)
    elif p.pipeline_schedule == "zb-v":
        vpp = 2

    iters = t.train_iters if t.train_iters not in (None, -1) else None
    samples = t.train_samples if t.train_samples not in (None, -1) else None
    if iters is None and samples is None and t.train_epochs in (None, -1):
        iters = DEFAULT_TRAIN_ITERS
    notes = []
    if iters is not None:
        samples = iters * gbs
    elif samples is not None:
        iters = samples // gbs
        if samples % gbs:
            notes.append(f"--train-samples {samples} is {iters} whole global batches of {gbs}: "
                         f"{iters * gbs} samples are trained")
        samples = iters * gbs

    schedule = {}  # Megatron's sample-based schedule flags, in iterations
    if t.lr_decay_samples is not None:
        schedule["lr_decay_iters"] = t.lr_decay_samples // gbs
    if t.lr_warmup_samples is not None:
        schedule["lr_warmup_iters"] = t.lr_warmup_samples // gbs
    data = c.data
    if data.vocab_file and data.tokenizer_type == "ByteTokenizer":  # Megatron's default with --vocab-file
        data = dataclasses.replace(data, tokenizer_type="GPT2BPETokenizer")
    filled = MegaliteConfig(
        parallel=dataclasses.replace(p, expert_tensor_parallel_size=d.expert_tensor_parallel_size),
        model=dataclasses.replace(m, num_query_groups=d.num_query_groups, ffn_hidden_size=d.ffn_hidden_size,
                                  moe_ffn_hidden_size=d.moe_ffn_hidden_size,
                                  attention_backend=MEGATRON_ATTENTION.get(m.attention_backend, m.attention_backend)),
        training=dataclasses.replace(t, global_batch_size=gbs, train_iters=iters, train_samples=samples, **schedule),
        data=data,
        sft=c.sft,
        megatron=c.megatron,
    )
    derived = Derived(**dataclasses.asdict(d), virtual_pipeline_size=vpp, train_iters=iters, train_samples=samples,
                      notes=tuple(notes))
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
    pairs = split_weights(data_path)
    assert pairs is not None, "validate() rejects malformed --data-path"
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]
