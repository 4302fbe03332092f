"""Checks that fail a run at start-up or at the first bad batch, not hours later, naming the flag or file.

- `resume_source`: which checkpoint a run starts from (its own `--save` first, then `--load`), and the line saying so;
- `probe_save_dir`: `--save` is created and written to before the first step;
- `check_splits`: the splits the flags need are not empty;
- `check_token_ids`: every token id of a batch lies inside the vocabulary.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megalite.checkpoint import latest_iteration
from megalite.checkpoint.hf_config import is_hf_directory
from megalite.config import MegaliteConfig, TrainingConfig
from megalite.errors import ConfigError, DataError


def resume_source(t: TrainingConfig) -> tuple[str | None, str | None]:
    """(directory to load, a line for the log). A run whose `--save` already holds checkpoints continues from them,
    whatever --load says (a relaunch after preemption); otherwise `--load` must hold a checkpoint or a Hugging Face
    model, except when it is `--save` itself (a first launch)."""
    if t.save and Path(t.save).is_dir() and latest_iteration(t.save) is not None:
        if t.load and Path(t.load).resolve() != Path(t.save).resolve():
            return t.save, f"--save {t.save} already holds this run's checkpoints: continuing from them, not --load {t.load}"
        return t.save, None
    if not t.load:
        return None, None
    if is_hf_directory(t.load) or (Path(t.load).is_dir() and latest_iteration(t.load) is not None):
        return t.load, None
    if t.save and Path(t.load).resolve() == Path(t.save).resolve():
        return None, f"--load {t.load} is --save and holds no checkpoint yet: starting fresh"
    raise ConfigError(f"--load {t.load}: no checkpoint (iter_* directory) and no Hugging Face model (config.json and "
                      "*.safetensors) there; check the path")


def probe_save_dir(t: TrainingConfig, rank: int) -> None:
    """Create --save and write a file there now, so a read-only or misplaced directory fails before training."""
    if not t.save:
        return
    probe = Path(t.save) / f".write-probe-rank{rank}"
    try:
        Path(t.save).mkdir(parents=True, exist_ok=True)
        probe.write_text("megalite")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--save {t.save}: cannot write there ({e.strerror or e}); give a writable directory") from e


def check_splits(config: MegaliteConfig, train_ds, valid_ds) -> None:
    """The training split, and the validation split when --eval-interval asks for it, hold samples."""
    d = config.data
    data = "the embedded corpus" if not d.data_path and not d.mock_data else (
        "--mock-data" if d.mock_data else f"--data-path {' '.join(d.data_path)}")
    if train_ds is None or len(train_ds) == 0:
        raise DataError(f"the training split of {data} is empty (--split {d.split}, --seq-length "
                        f"{config.model.seq_length}); give the first --split share more, or more data")
    if config.training.eval_interval and (valid_ds is None or len(valid_ds) == 0):
        raise DataError(f"--eval-interval {config.training.eval_interval} needs a validation split, but --split "
                        f"{d.split} leaves {data} none; give the second --split share some data, or drop "
                        "--eval-interval")


def check_token_ids(batch: dict[str, torch.Tensor], config: MegaliteConfig) -> None:
    """Every token id and label lies in [0, vocabulary): data tokenized with another tokenizer fails here, naming
    the data and the tokenizer, instead of deep inside the embedding."""
    vocab = config.model.vocab_size
    for key in ("tokens", "labels"):
        if key in batch and batch[key].numel():
            low, high = int(batch[key].min()), int(batch[key].max())
            if low < 0 or high >= vocab:
                d = config.data
                tokenizer = d.tokenizer_model or d.tokenizer_type
                data = " ".join(d.data_path) if d.data_path else "the embedded corpus"
                raise DataError(f"token id {high if high >= vocab else low} in {data} is outside the vocabulary of "
                                f"{vocab} ids of the tokenizer ({tokenizer}); the data was tokenized with another "
                                "tokenizer: preprocess it again, or give the matching --tokenizer-model")
