"""GPT datasets over indexed datasets, as Megatron-LM builds them: split, epochs, shuffles, samples, blending.

For one dataset prefix and one split (train/valid/test: a contiguous range of its documents):

- document index: the split's documents tiled over as many epochs as the requested samples need, shuffled with
  `numpy.random.RandomState(seed)` (when the last epoch is used for less than 80% it is shuffled on its own, so
  the earlier epochs stay whole);
- sample index (C++, `build_sample_index`): where each sample of seq_length + 1 tokens starts in the token stream
  of the shuffled documents; samples cross document boundaries and overlap by one token (the last label);
- shuffle index: a permutation of the samples (again keeping a partial last epoch apart).

The three are cached as .npy files keyed by an MD5 of everything that defines them, built on rank 0 and
memory-mapped by every rank. With the same seed this is the same random stream Megatron-LM draws, so the same
data gives the same samples in the same order as Megatron-LM, on every run and every parallel layout.
Several weighted prefixes are blended sample by sample (`build_blending_indices`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from typing import BinaryIO, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from megalite import comm
from megalite.arguments import weighted_data_paths
from megalite.config import MegaliteConfig
from megalite.data.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megalite.data.indices import build_blending_indices, build_sample_index
from megalite.data.tokenizers import Tokenizer

SPLITS = ("train", "valid", "test")
ADD_EXTRA_TOKEN = 1
"""Each sample reads seq_length + 1 tokens: the inputs, and shifted by one, the labels."""
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.8
"""A last epoch used for less than this fraction of its samples is shuffled apart from the others."""
BLEND_MARGIN = 1.005
"""Each blended dataset is built with this much more than its share of samples (Megatron-LM's margin)."""
CACHE_FORMAT = 1
"""Bump when the cached indices change meaning, so that old caches are not reused."""


class TokenSource(Protocol):
    """What a GPT dataset reads: sequence lengths and slices of sequences (an IndexedDataset, or mock data)."""

    sequence_lengths: np.ndarray

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...


class MockTokenSource:
    """Deterministic random documents (no files): `num_documents` of 1..`max_length` random tokens, each ending
    with end-of-document. The content is fixed; the training seed still drives the order."""

    def __init__(self, vocab_size: int, eod: int, num_documents: int = 4096, max_length: int = 1024, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.sequence_lengths = rng.integers(1, max_length + 1, size=num_documents, dtype=np.int32)
        self._pointers = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        tokens = rng.integers(0, vocab_size - 1, size=int(self._pointers[-1]), dtype=np.int64)
        self._tokens = np.where(tokens >= eod, tokens + 1, tokens)  # every id but eod
        self._tokens[self._pointers[1:] - 1] = eod

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = int(self._pointers[idx]) + offset
        stop = int(self._pointers[idx + 1]) if length is None else start + length
        return self._tokens[start:stop]


def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '969/30/1', or fewer parts) -> train/valid/test fractions summing to 1."""
    parts = [float(x) for x in re.split(r"[,/]", split.strip("'\""))]  # quotes a shell script left in
    parts += [0.0] * (len(SPLITS) - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(fractions: list[float], num_documents: int) -> list[tuple[int, int]]:
    """Document ranges [begin, end) of each split, rounded as Megatron-LM rounds them (the rounding error is
    taken off the end of every split, so the last one ends at `num_documents`)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [0] + [b - excess for b in bounds[1:]]
    return list(zip(bounds[:-1], bounds[1:]))


def _document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final: bool
                    ) -> np.ndarray:
    if separate_final and num_epochs > 1:
        return np.concatenate([_document_index(documents, num_epochs - 1, rng, False),
                               _document_index(documents, 1, rng, False)])
    index = np.tile(documents.astype(np.int32), num_epochs)
    rng.shuffle(index)
    return index


def _shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by one of [num_samples, total)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(
    sequence_lengths: np.ndarray, begin: int, end: int, num_samples: int | None, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document index, sample index, shuffle index) of documents [begin, end) for at least `num_samples`
    samples (one epoch when None), exactly as Megatron-LM's GPTDataset builds them."""
    tokens_per_epoch = int(sequence_lengths[begin:end].sum(dtype=np.int64))
    if tokens_per_epoch <= ADD_EXTRA_TOKEN:
        raise ValueError(f"documents [{begin}, {end}) hold {tokens_per_epoch} tokens; a sample needs at least 2.")
    num_epochs = 1
    if num_samples is not None:
        num_epochs = max(1, math.ceil((num_samples * seq_length + ADD_EXTRA_TOKEN) / tokens_per_epoch))
    samples_before_final = ((num_epochs - 1) * tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length
    samples_per_epoch = (tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length
    separate_final = num_epochs > 1 and (
        num_samples - samples_before_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch))
    rng = np.random.RandomState(seed)
    document_index = _document_index(np.arange(begin, end), num_epochs, rng, separate_final)
    sample_index = build_sample_index(
        np.ascontiguousarray(sequence_lengths, dtype=np.int32), document_index, seq_length, num_epochs,
        tokens_per_epoch, True, ADD_EXTRA_TOKEN,
    )
    total = len(sample_index) - 1
    shuffle_index = _shuffle_index(samples_before_final if separate_final else total, total, rng)
    return document_index, sample_index, shuffle_index


def _write_atomically(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write(file)` under a temporary name, then rename: readers never see it partial."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        write(f)
    os.replace(temporary, path)


def cached_gpt_indices(
    cache_dir: str | None, description: dict, build: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], bool]:
    """The indices `build` makes, from `cache_dir` when they are there (memory-mapped), else built and saved
    there (unless `cache_dir` is None). Returns (indices, whether they came from the cache)."""
    if cache_dir is None:
        return build(), False
    text = json.dumps(description, indent=2, sort_keys=True)
    base = os.path.join(cache_dir, f"{hashlib.md5(text.encode()).hexdigest()}-GPTDataset-{description['split']}")
    names = ("document_index", "sample_index", "shuffle_index")
    paths = [f"{base}-{name}.npy" for name in names]
    if all(map(os.path.isfile, paths + [f"{base}-description.txt"])):
        return tuple(np.load(path, mmap_mode="r") for path in paths), True  # type: ignore[return-value]
    indices = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for path, array in zip(paths, indices):
            _write_atomically(path, lambda f, a=array: np.save(f, a))
        _write_atomically(f"{base}-description.txt", lambda f: f.write(text.encode()))  # last: the set is complete
    except OSError as e:
        raise OSError(f"cannot write dataset indices to {cache_dir} ({e}); set --data-cache-path to a writable "
                      "directory shared by all ranks.") from e
    return indices, False


def document_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Positions [s] that restart at 0 on the token after each end-of-document token (the EOD itself ends its
    document), as Megatron-LM's --reset-position-ids numbers them."""
    starts = torch.zeros_like(tokens)
    starts[1:] = tokens[:-1] == eod  # a document starts after each EOD
    index = torch.arange(tokens.numel(), dtype=torch.int64)
    first = torch.cummax(torch.where(starts.bool(), index, torch.zeros_like(index)), dim=0).values
    return index - first


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `seq_length` tokens from documents [begin, end) of `source`.

    `ds[i]` is a dict of tensors: `tokens` and `labels` (int64, labels = tokens shifted by one), `loss_mask`
    (float32; 0 where the input token is end-of-document when `eod_mask_loss`, as Megatron-LM masks it) and
    `position_ids` (int64: 0..seq_length-1, or restarting after each EOD with `reset_position_ids`); with
    `reset_attention_mask`, `document_ids` (int64, +1 after each EOD), inside which attention stays.
    """

    def __init__(self, source: TokenSource, indices: tuple[np.ndarray, np.ndarray, np.ndarray], seq_length: int,
                 eod: int, eod_mask_loss: bool, from_cache: bool = False, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False):
        self.source = source
        self.document_index, self.sample_index, self.shuffle_index = indices
        self.seq_length, self.eod, self.eod_mask_loss = seq_length, eod, eod_mask_loss
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self.from_cache = from_cache  # whether the indices were loaded from the cache rather than built

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 token ids of sample `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside this dataset of {len(self)} samples.")
        k = int(self.shuffle_index[i])
        (first, start), (last, stop) = self.sample_index[k], self.sample_index[k + 1]
        parts = []
        for j in range(int(first), int(last) + 1):
            offset = int(start) if j == first else 0
            length = int(stop) + ADD_EXTRA_TOKEN - offset if j == last else None
            parts.append(self.source.get(int(self.document_index[j]), offset, length))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.sample_tokens(i))
        tokens, labels = text[:-1], text[1:]
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod] = 0.0
        sample = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": document_position_ids(tokens, self.eod) if self.reset_position_ids
            else torch.arange(self.seq_length, dtype=torch.int64),
        }
        if self.reset_attention_mask:
            sample["document_ids"] = document_ids(tokens, self.eod)
        return sample


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document ids [s]: 0 for the first document, +1 on the token after each end-of-document token."""
    ids = torch.zeros_like(tokens)
    ids[1:] = torch.cumsum(tokens[:-1] == eod, dim=0)
    return ids


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights`, interleaved deterministically."""

    def __init__(self, datasets: list[torch.utils.data.Dataset], weights: list[float], size: int):
        self.datasets = datasets
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size)
        for d, dataset in enumerate(datasets):
            needed = int(np.count_nonzero(self.dataset_index == d))
            if needed > len(dataset):  # type: ignore[arg-type]
                raise ValueError(f"blended dataset {d} has {len(dataset)} samples but the blend draws {needed}.")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


T = TypeVar("T")


def rank_zero_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then, after a barrier, on the other ranks (which find rank 0's files in place)."""
    if not dist.is_initialized():
        return fn()
    if dist.get_rank() == 0:
        try:
            return fn()
        finally:
            comm.barrier(what="dataset index barrier (rank 0 builds, the others wait)")
    comm.barrier(what="dataset index barrier (rank 0 builds, the others wait)")
    return fn()


Source = tuple[float, "str | None", TokenSource]
"""A dataset to draw from: (weight, prefix or None for mock data, its tokens)."""


def _sources(config: MegaliteConfig, tokenizer: Tokenizer) -> list[Source]:
    """The datasets the config names: --mock-data, --data-path (weighted), or the embedded corpus."""
    data = config.data
    if data.mock_data:
        return [(1.0, None, MockTokenSource(tokenizer.vocab_size, tokenizer.eod))]
    if data.data_path is None:
        from megalite.data.corpus import default_corpus_prefix

        pairs = [(1.0, default_corpus_prefix(tokenizer))]
    else:
        pairs = weighted_data_paths(data.data_path)
    sources: list[Source] = []
    for weight, prefix in pairs:
        source = IndexedDataset(prefix)
        if source.dtype.kind not in "iu":
            raise ValueError(f"--data-path {prefix}: tokens are {source.dtype}; a GPT dataset needs integer ids.")
        sources.append((weight, prefix, source))
    return sources


def _cache_dir(config: MegaliteConfig, prefix: str | None) -> str | None:
    if prefix is None:
        return None
    if config.data.data_cache_path:
        return config.data.data_cache_path
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")


def _description(prefix: str, split: str, fractions: list[float], documents: tuple[int, int], num_samples: int,
                 config: MegaliteConfig) -> dict:
    files = {}
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        stat = os.stat(path)
        files[os.path.basename(path)] = [stat.st_size, stat.st_mtime_ns]
    return {
        "class": "GPTDataset", "format": CACHE_FORMAT, "path_prefix": os.path.abspath(prefix), "files": files,
        "split": split, "split_fractions": fractions, "documents": list(documents), "num_samples": num_samples,
        "seq_length": config.model.seq_length, "add_extra_token": ADD_EXTRA_TOKEN, "seed": config.training.seed,
    }


def _build_split(config: MegaliteConfig, tokenizer: Tokenizer, sources: list[Source], split_id: int,
                 num_samples: int) -> torch.utils.data.Dataset | None:
    fractions = parse_split(config.data.split)
    if num_samples <= 0 or fractions[split_id] == 0:
        return None
    seq_length, seed = config.model.seq_length, config.training.seed
    parts: list[tuple[float, GPTDataset]] = []
    for weight, prefix, source in sources:
        begin, end = split_ranges(fractions, len(source.sequence_lengths))[split_id]
        if weight == 0 or int(source.sequence_lengths[begin:end].sum(dtype=np.int64)) <= ADD_EXTRA_TOKEN:
            continue
        wanted = num_samples if len(sources) == 1 else math.ceil(math.ceil(num_samples * weight) * BLEND_MARGIN)
        description = _description(prefix, SPLITS[split_id], fractions, (begin, end), wanted, config) if prefix else {}
        indices, from_cache = cached_gpt_indices(
            _cache_dir(config, prefix), description,
            functools.partial(build_gpt_indices, source.sequence_lengths, begin, end, wanted, seq_length, seed),
        )
        parts.append((weight, GPTDataset(source, indices, seq_length, tokenizer.eod, config.data.eod_mask_loss,
                                         from_cache, config.data.reset_position_ids,
                                         config.data.reset_attention_mask)))
    if not parts:  # an empty split; `engine.checks.check_splits` refuses it where a flag needs it
        return None
    if len(parts) == 1:
        return parts[0][1]
    return BlendedDataset([d for _, d in parts], [w for w, _ in parts], num_samples)


def build_gpt_datasets(
    config: MegaliteConfig, tokenizer: Tokenizer, num_samples: tuple[int, int, int]
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """Train, validation and test datasets with at least `num_samples` samples each (None where a split is empty
    or no samples are asked), from --data-path (blended by weight), the embedded corpus, or --mock-data."""
    def build() -> tuple:
        sources = _sources(config, tokenizer)
        return tuple(_build_split(config, tokenizer, sources, k, n) for k, n in enumerate(num_samples))

    return rank_zero_first(build)


def samples_per_epoch(config: MegaliteConfig, tokenizer: Tokenizer) -> int:
    """Training samples in one epoch of the train split (summed over the blended datasets)."""
    def count() -> int:
        fractions = parse_split(config.data.split)
        total = 0
        for _, _, source in _sources(config, tokenizer):
            begin, end = split_ranges(fractions, len(source.sequence_lengths))[0]
            tokens = int(source.sequence_lengths[begin:end].sum(dtype=np.int64))
            total += max(0, (tokens - ADD_EXTRA_TOKEN) // config.model.seq_length)
        return total

    return rank_zero_first(count)
