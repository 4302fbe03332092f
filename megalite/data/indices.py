"""The C++ index builders (`megalite._C`) behind argument checks that name the bad argument and the fix."""
from __future__ import annotations

from typing import Any

import numpy as np

from megalite import _C


def _vector(name: str, value: Any, dtypes: tuple[type, ...]) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, not {type(value).__name__}.")
    if value.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, but has shape {value.shape}.")
    if value.dtype not in [np.dtype(d) for d in dtypes]:
        wanted = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; pass {wanted}, e.g. .astype(np.{np.dtype(dtypes[0]).name}).")
    return np.ascontiguousarray(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, not {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} = {value} must be at least {minimum}.")
    return int(value)


def build_sample_index(
    sequence_lengths: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """Where each GPT sample starts, as Megatron-LM's sample index: int64 [num_samples + 1, 2].

    The documents `document_index` lists (ids into `sequence_lengths`; `num_epochs` epochs of `tokens_per_epoch`
    tokens) are read as one token stream. Sample k is stream positions [k * seq_length, (k + 1) * seq_length +
    add_extra_token_to_sequence); row k is (position in `document_index`, offset in that document) of its start,
    and row num_samples closes the last sample. num_samples = (num_epochs * tokens_per_epoch - extra) //
    seq_length, rounded up instead when `drop_last_partial_sequence` is False (the last sample is then short).
    """
    sizes = _vector("sequence_lengths", sequence_lengths, (np.int32,))
    docs = _vector("document_index", document_index, (np.int32, np.int64))
    seq_length = _integer("seq_length", seq_length, 1)
    num_epochs = _integer("num_epochs", num_epochs, 1)
    tokens_per_epoch = _integer("tokens_per_epoch", tokens_per_epoch, 0)
    if num_epochs * tokens_per_epoch >= 2**62:
        raise ValueError(f"num_epochs * tokens_per_epoch = {num_epochs * tokens_per_epoch} overflows int64 positions.")
    if not isinstance(drop_last_partial_sequence, (bool, np.bool_)):
        raise TypeError(f"drop_last_partial_sequence must be a bool, not {drop_last_partial_sequence!r}.")
    if add_extra_token_to_sequence not in (0, 1):
        raise ValueError(f"add_extra_token_to_sequence = {add_extra_token_to_sequence!r} must be 0 or 1.")
    extra = int(add_extra_token_to_sequence)
    return _C.build_sample_index(
        sizes, docs, seq_length, num_epochs, tokens_per_epoch, bool(drop_last_partial_sequence), extra
    )


MAX_BLENDED_DATASETS = int(np.iinfo(np.int16).max) + 1


def build_blending_indices(weights: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset, and which sample of it, each of `size` blended samples comes from.

    Weights are normalised to sum to 1; sample i goes to the dataset furthest below its share
    (weight * max(i, 1) minus the samples it already has; ties to the lowest id), as Megatron-LM blends.
    Returns (dataset id per sample: int16, sample id within that dataset: int64).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not 1 <= len(w) <= MAX_BLENDED_DATASETS:
        raise ValueError(f"weights must be a list of 1 to {MAX_BLENDED_DATASETS} numbers, not shape {w.shape}.")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {w.tolist()} must be finite and non-negative, with a positive sum.")
    size = _integer("size", size, 0)
    return _C.build_blending_indices(np.ascontiguousarray(w / w.sum()), size)
