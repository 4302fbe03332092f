"""The model flags a saved model implies, filled into parsed flags: from a Hugging Face directory's config.json (and
its tokenizer.json), or from a megalite checkpoint's index (its model and tokenizer). A flag given on the command
line with another value is an error naming both (`arguments.fill_fields`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from megalite.arguments import build_parser, fill_fields
from megalite.checkpoint.hf_config import flags_of, is_hf_directory, model_fields, read_hf_config
from megalite.checkpoint.state import PARAMETER_FIELDS, latest_iteration, read_index
from megalite.config import ModelConfig
from megalite.errors import CheckpointError

FORWARD_FIELDS = PARAMETER_FIELDS + (
    "norm_epsilon", "rotary_base", "position_embedding_type", "rotary_percent", "moe_router_topk",
    "moe_router_score_function", "moe_router_pre_softmax", "moe_expert_capacity_factor", "moe_token_drop_policy",
)
"""Model settings that change what a saved model computes: taken from a megalite checkpoint."""
DEFAULT_MODEL = ModelConfig()
TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")


def model_flags_from_hf(ns: argparse.Namespace) -> str | None:
    """With --load pointing at a Hugging Face model directory: its config.json sets the model flags (a contradicting
    flag is an error) and its tokenizer.json the tokenizer; returns the line that says so, else None."""
    if not ns.load or not is_hf_directory(ns.load):
        return None
    config_path = Path(ns.load) / "config.json"
    fields = model_fields(read_hf_config(ns.load), str(config_path))
    tokenizer = Path(ns.load) / "tokenizer.json"
    if ns.tokenizer_model is None and tokenizer.is_file():
        fields |= {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tokenizer)}
    fill_fields(ns, fields, str(config_path))
    return f"model flags from {config_path}: {' '.join(flags_of(fields))}"


def model_flags_from_checkpoint(ns: argparse.Namespace) -> str:
    """--load as a Hugging Face directory (see `model_flags_from_hf`) or a megalite checkpoint directory: the newest
    checkpoint's model settings and, unless given, the tokenizer it was trained with (a converted model's
    `tokenizer/tokenizer.json`). Returns the line that says what was taken."""
    from_hf = model_flags_from_hf(ns)
    if from_hf is not None:
        return from_hf
    iteration = latest_iteration(ns.load) if Path(ns.load).is_dir() else None
    if iteration is None:
        raise CheckpointError(f"--load {ns.load}: neither a megalite checkpoint (no iter_* directory) nor a Hugging "
                              "Face model directory (no config.json); check the path")
    index_dir = Path(ns.load) / f"iter_{iteration:07d}"
    index = read_index(index_dir, ns.load)
    fields = {k: v for k, v in index.get("model", {}).items() if k in FORWARD_FIELDS}
    shown = {k: v for k, v in fields.items() if v != getattr(DEFAULT_MODEL, k)}
    converted = Path(ns.load) / "tokenizer" / "tokenizer.json"
    if all(getattr(ns, k) is None for k in TOKENIZER_FIELDS):
        if converted.is_file():
            fields |= {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(converted)}
        else:
            saved = build_parser().parse_known_args([str(a) for a in index.get("args", [])])[0]
            fields |= {k: getattr(saved, k) for k in TOKENIZER_FIELDS if getattr(saved, k) is not None}
    fill_fields(ns, fields, str(index_dir / "index.json"))
    shown |= {k: v for k, v in fields.items() if k in TOKENIZER_FIELDS}
    return f"model flags from {index_dir / 'index.json'}: {' '.join(flags_of(shown)) or '(the defaults)'}"
