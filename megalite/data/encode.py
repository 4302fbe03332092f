"""Records in, indexed dataset out: tokenizing the records of `megalite.data.documents` on worker processes,
writing the `.bin`/`.idx` pair, with a progress bar on stderr. Shared by `megalite preprocess` and the embedded
corpus."""
from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.pool
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from megalite.data.documents import Record
from megalite.data.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path, token_dtype
from megalite.data.tokenizers import HuggingFaceTokenizer, Tokenizer

Batch = tuple[list[list[str]], int]
"""The texts of several records and their input bytes."""


class ProgressBar:
    """`label [#####.....]  45%  14.2/31.5 MB  12.0 MB/s` on one line of `stream`, redrawn in place at most 10
    times a second on a terminal; `close` prints the final state (the only line when not on a terminal)."""

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr, width: int = 30):
        self.total, self.label, self.stream, self.width = max(total, 1), label, stream, width
        self.done = 0
        self._live = stream.isatty()
        self._start = self._drawn = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if self._live and time.monotonic() - self._drawn >= 0.1:
            self._draw("\r")

    def _draw(self, start: str) -> None:
        self._drawn = time.monotonic()
        fraction = min(self.done / self.total, 1.0)
        filled = int(fraction * self.width)
        rate = self.done / max(self._drawn - self._start, 1e-9) / 1e6
        self.stream.write(
            f"{start}{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {fraction:4.0%}  "
            f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB  {rate:.1f} MB/s"
        )
        self.stream.flush()

    def close(self) -> None:
        self._draw("\r" if self._live else "")
        self.stream.write("\n")
        self.stream.flush()


class _Encoder:
    """Tokenizes a batch of records into arrays of the output dtype (per record, one document per key)."""

    def __init__(self, tokenizer: Tokenizer, append_eod: bool):
        self.tokenizer, self.append_eod = tokenizer, append_eod
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, batch: Batch) -> tuple[list[list[np.ndarray]], int]:
        records, size = batch
        encoded = []
        for texts in records:
            docs = []
            for text in texts:
                ids = self.tokenizer.tokenize_array(text)
                if self.append_eod and ids.size:  # an empty text stays empty, and is skipped
                    ids = np.append(ids, self.tokenizer.eod)
                docs.append(ids.astype(self.dtype))
            encoded.append(docs)
        return encoded, size


_worker_encoder: _Encoder | None = None


def _set_worker_encoder(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(batch: Batch) -> tuple[list[list[np.ndarray]], int]:
    assert _worker_encoder is not None
    return _worker_encoder(batch)


def _batches(records: Iterable[Record], max_bytes: int = 1 << 20, max_records: int = 1024) -> Iterator[Batch]:
    batch: list[list[str]] = []
    size = 0
    for texts, n in records:
        batch.append(texts)
        size += n
        if size >= max_bytes or len(batch) >= max_records:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _ordered_map(pool: multiprocessing.pool.Pool, batches: Iterable[Batch], window: int
                 ) -> Iterator[tuple[list[list[np.ndarray]], int]]:
    """`pool.imap` that reads at most `window` batches ahead, so memory stays bounded on any input size."""
    pending: collections.deque = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_in_worker, (batch,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@dataclass
class EncodeSummary:
    """What `encode_to_datasets` wrote to one output prefix."""

    prefix: str
    documents: int
    tokens: int


def encode_to_datasets(
    records: Iterable[Record],
    tokenizer: Tokenizer,
    output_prefixes: Sequence[str],
    *,
    append_eod: bool,
    workers: int,
    total_bytes: int,
    label: str = "tokenizing",
    progress: bool = True,
) -> list[EncodeSummary]:
    """Tokenize `records` (the i-th text of each record goes to `output_prefixes[i]`) on `workers` processes and
    write one indexed dataset per prefix, one document (one sequence) per non-empty text, in input order.
    Each dataset appears complete or not at all: it is written under a temporary name and renamed."""
    encoder = _Encoder(tokenizer, append_eod)
    temporary = [f"{prefix}.tmp-{os.getpid()}" for prefix in output_prefixes]
    for prefix in output_prefixes:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builders = [IndexedDatasetBuilder(get_bin_path(t), encoder.dtype) for t in temporary]
    summaries = [EncodeSummary(prefix, 0, 0) for prefix in output_prefixes]
    bar = ProgressBar(total_bytes, label) if progress else None
    pool = None
    try:
        if workers > 1:
            if isinstance(tokenizer, HuggingFaceTokenizer):
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
            pool = multiprocessing.Pool(workers, initializer=_set_worker_encoder, initargs=(encoder,))
            results = _ordered_map(pool, _batches(records), window=2 * workers)
        else:
            results = map(encoder, _batches(records))
        for encoded, size in results:
            for docs in encoded:
                for builder, summary, ids in zip(builders, summaries, docs):
                    if ids.size:
                        builder.add_item(ids)
                        builder.end_document()
                        summary.documents += 1
                        summary.tokens += ids.size
            if bar is not None:
                bar.update(size)
        for builder, t, prefix in zip(builders, temporary, output_prefixes):
            builder.finalize(get_idx_path(t))
            os.replace(get_bin_path(t), get_bin_path(prefix))
            os.replace(get_idx_path(t), get_idx_path(prefix))
    finally:
        if pool is not None:
            pool.terminate()
        for t in temporary:
            for path in (get_bin_path(t), get_idx_path(t)):
                if os.path.exists(path):
                    os.remove(path)
        if bar is not None:
            bar.close()
    return summaries
