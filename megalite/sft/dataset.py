"""SFT datasets: conversations tokenized once (cached like the pretraining data), split, and packed.

Tokenizing. Every conversation of the --data-path files (in order) becomes its tokens and loss mask through the chat
format; both are written once as indexed datasets (`<cache>/<file>-<key>_tokens` and `_mask`, one document per
conversation) keyed by the file's contents, the chat format and the keys, and reused by every later run.

Splitting. --split cuts the conversations into contiguous train/validation/test ranges (as Megatron cuts documents).

Packing (best-fit decreasing). Conversations, longest first, each go into the bin of --seq-length + 1 tokens with
the least room that still holds it (a new bin when none does); a bin's conversations keep their file order. Padding
fills the rest of each bin (the padding share is logged). --no-pack gives every conversation its own bin. A
conversation longer than a bin is cut, left out or refused (--sft-overlong), and counted.

A sample is a bin: tokens = bin[:-1], labels = bin[1:], loss_mask = the label's mask, never across conversations;
position_ids restart per conversation with --reset-position-ids; document_ids (one per conversation, one for the
padding) with --reset-attention-mask, which keeps attention inside each conversation. Bins are visited in a seeded
order, reshuffled each epoch.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megalite.config import MegaliteConfig
from megalite.data.gpt_dataset import parse_split, rank_zero_first, split_ranges
from megalite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, get_bin_path, get_idx_path, \
    token_dtype
from megalite.data.tokenizers import Tokenizer
from megalite.errors import DataError
from megalite.sft.chat import ChatFormat, build_chat_format
from megalite.sft.conversations import read_conversations

CACHE_FORMAT = "megalite-sft/1"


@dataclass
class Tokenized:
    """The conversations of all files: tokens and masks (one document each) and where each came from."""

    tokens: list[IndexedDataset]
    masks: list[IndexedDataset]
    where: list[str]

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation i's (tokens, mask)."""
        for tokens, masks in zip(self.tokens, self.masks):
            if i < len(tokens):
                return tokens[i], masks[i]
            i -= len(tokens)
        raise IndexError(i)

    def lengths(self) -> np.ndarray:
        return np.concatenate([t.sequence_lengths for t in self.tokens]).astype(np.int64)


def _cache_key(path: Path, config: MegaliteConfig, chat: ChatFormat) -> str:
    s = config.sft
    fields = [CACHE_FORMAT, hashlib.sha256(path.read_bytes()).hexdigest(), chat.identity, s.sft_messages_key,
              s.sft_prompt_key, s.sft_answer_key, s.sft_system_key]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]


def _tokenize_file(path: Path, config: MegaliteConfig, chat: ChatFormat, vocab_size: int
                   ) -> tuple[IndexedDataset, IndexedDataset, list[str]]:
    if not path.is_file():
        raise DataError(f"--data-path {path}: no such file (with --sft, give JSON-lines conversation files)")
    cache = Path(config.data.data_cache_path or path.resolve().parent / "cache" / "SFTDataset")
    prefix = str(cache / f"{path.stem}-{_cache_key(path, config, chat)}")
    meta = Path(prefix + ".json")
    if not meta.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        conversations = read_conversations(str(path), config.sft)
        tmp = f"{prefix}.tmp{os.getpid()}"
        tokens = IndexedDatasetBuilder(get_bin_path(tmp + "_tokens"), token_dtype(vocab_size))
        masks = IndexedDatasetBuilder(get_bin_path(tmp + "_mask"), np.uint8)
        for c in conversations:
            ids, mask = chat.encode(c)
            tokens.add_item(np.asarray(ids, dtype=np.int64))
            tokens.end_document()
            masks.add_item(np.asarray(mask, dtype=np.uint8))
            masks.end_document()
        for builder, kind in ((tokens, "_tokens"), (masks, "_mask")):
            builder.finalize(get_idx_path(tmp + kind))
            for name in (get_bin_path, get_idx_path):
                os.replace(name(tmp + kind), name(prefix + kind))
        tmp_meta = Path(f"{prefix}.json.tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps({"format": CACHE_FORMAT, "where": [c.where for c in conversations]}))
        os.replace(tmp_meta, meta)  # written last: the cache entry is complete
    return (IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_mask"),
            json.loads(meta.read_text())["where"])


def tokenize_conversations(config: MegaliteConfig, tokenizer: Tokenizer) -> Tokenized:
    """Every conversation of --data-path, tokenized (or read from the cache)."""
    paths = config.data.data_path or []  # checked by validation.training.sft_data_given
    chat = build_chat_format(config.sft, tokenizer, config.data.tokenizer_model)
    parts = [_tokenize_file(Path(p), config, chat, tokenizer.vocab_size) for p in paths]
    return Tokenized([p[0] for p in parts], [p[1] for p in parts], [w for p in parts for w in p[2]])


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: bins (lists of item indices in increasing order) of total length <= capacity."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            bins.append([i])
            b, free = len(bins) - 1, capacity - lengths[i]
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, b))
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class PackStats:
    conversations: int
    cut: int
    dropped: int
    bins: int
    padding: float
    """Share of the bins' tokens that are padding."""

    def line(self, split: str) -> str:
        return (f"{split}: {self.conversations} conversations in {self.bins} samples, padding {self.padding:.1%}"
                + (f", {self.cut} cut to the sequence length" if self.cut else "")
                + (f", {self.dropped} left out as too long" if self.dropped else ""))


class SFTDataset(torch.utils.data.Dataset):
    """`num_samples` samples (see the module docstring) from the bins of conversations `ids` of `source`."""

    def __init__(self, source: Tokenized, ids: list[int], config: MegaliteConfig, pad: int, num_samples: int):
        self.source, self.pad, self.num_samples = source, pad, num_samples
        self.seq_length, self.seed = config.model.seq_length, config.training.seed
        self.reset_position_ids = config.data.reset_position_ids
        self.reset_attention_mask = config.data.reset_attention_mask
        capacity, policy = self.seq_length + 1, config.sft.sft_overlong
        all_lengths = source.lengths()
        kept, lengths, cut, dropped = [], [], 0, 0
        for i in ids:
            n = int(all_lengths[i])
            if n > capacity:
                if policy == "error":
                    raise DataError(f"{source.where[i]}: the conversation has {n} tokens, more than --seq-length "
                                    f"{self.seq_length} + 1 (--sft-overlong truncate or drop allows it)")
                if policy == "drop":
                    dropped += 1
                    continue
                cut += 1
            kept.append(i)
            lengths.append(min(n, capacity))
        self.lengths = dict(zip(kept, lengths))
        groups = [[i] for i in range(len(kept))] if config.sft.no_pack else pack(lengths, capacity)
        self.bins = [[kept[j] for j in g] for g in groups]
        used = sum(lengths)
        self.stats = PackStats(len(kept), cut, dropped, len(self.bins),
                               1 - used / (len(self.bins) * capacity) if self.bins else 0.0)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples if self.bins else 0

    def _bin(self, i: int) -> list[int]:
        epoch, j = divmod(i, len(self.bins))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.RandomState((self.seed + epoch) % 2**32).permutation(len(self.bins))
        return self.bins[self._orders[epoch][j]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens, masks, documents = [], [], []
        for d, c in enumerate(self._bin(i)):
            t, m = self.source.get(c)
            n = self.lengths[c]
            tokens.append(np.asarray(t[:n], dtype=np.int64))
            masks.append(np.asarray(m[:n], dtype=np.float32))
            documents.append(np.full(n, d, dtype=np.int64))
        pad = self.seq_length + 1 - sum(len(t) for t in tokens)
        tokens.append(np.full(pad, self.pad, dtype=np.int64))
        masks.append(np.zeros(pad, dtype=np.float32))
        documents.append(np.full(pad, len(documents), dtype=np.int64))
        t, m, d = (torch.from_numpy(np.concatenate(x)) for x in (tokens, masks, documents))
        sample = {"tokens": t[:-1], "labels": t[1:], "loss_mask": m[1:] * (d[1:] == d[:-1])}
        index = torch.arange(self.seq_length)
        if self.reset_position_ids:
            starts = torch.ones(self.seq_length, dtype=torch.bool)
            starts[1:] = d[1:-1] != d[:-2]
            sample["position_ids"] = index - torch.cummax(torch.where(starts, index, 0), dim=0).values
        if self.reset_attention_mask:
            sample["document_ids"] = d[:-1]
        return sample


def build_sft_datasets(config: MegaliteConfig, tokenizer: Tokenizer, num_samples: tuple[int, int, int]
                       ) -> tuple[SFTDataset | None, SFTDataset | None, SFTDataset | None]:
    """Train, validation and test datasets of `num_samples` samples each (None where a split has no conversation or
    no samples are asked)."""
    def build() -> tuple:
        source = tokenize_conversations(config, tokenizer)
        ranges = split_ranges(parse_split(config.data.split), len(source.where))
        out = []
        for (begin, end), n in zip(ranges, num_samples):
            ds = SFTDataset(source, list(range(begin, end)), config, tokenizer.eod, n) if n > 0 else None
            out.append(ds if ds is not None and ds.bins else None)
        return tuple(out)

    return rank_zero_first(build)


def sft_samples_per_epoch(config: MegaliteConfig, tokenizer: Tokenizer) -> int:
    """Samples (bins) in one epoch of the train split."""
    train = build_sft_datasets(config, tokenizer, (1, 0, 0))[0]
    return len(train.bins) if train is not None else 0
