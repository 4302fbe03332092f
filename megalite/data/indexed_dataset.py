"""Megatron-LM's MMIDIDX indexed dataset: token ids in `PREFIX.bin`, their layout in `PREFIX.idx`.

The `.idx` file, all little-endian, byte for byte as Megatron-LM writes and reads it:

    9 bytes    magic b"MMIDIDX\\x00\\x00"
    u64        version, 1
    u8         dtype code of the tokens in .bin (`DTYPE_CODES`)
    u64        S, the number of sequences
    u64        D, the number of document indices (documents + 1)
    int32[S]   sequence lengths, in tokens
    int64[S]   sequence pointers, the byte offset of each sequence in .bin
    int64[D]   document indices: document k is sequences [doc[k], doc[k + 1]); doc[0] = 0, doc[D - 1] = S

The `.bin` file holds the sequences back to back. Both files are memory-mapped; reading part of a sequence
touches only its bytes. Anything inconsistent raises `IndexedDatasetError` naming the file and the problem.
"""
from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")
"""magic, version, dtype code, sequence count, document-index count: 34 bytes."""

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

LEGACY_MAGIC = b"TNTIDX\x00\x00"
"""Magic of Megatron-LM's older non-mmap ("lazy"/"cached") index format, which megalite does not read."""


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair that cannot be read; the message names the file, the problem and the fix."""


def get_idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def get_bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token dtype for a vocabulary (Megatron-LM's choice: uint16 below 65500 ids, else int32)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _check_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise TypeError(f"dtype {dtype} cannot be stored in an MMIDIDX dataset; use one of {names}.")
    return dtype


def write_index(idx_path: str, dtype: Any, sequence_lengths: Sequence[int], document_indices: Sequence[int]) -> None:
    """Write an `.idx` file for sequences of `sequence_lengths` tokens stored back to back in the `.bin`."""
    dtype = _check_dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{idx_path}: sequence lengths must be in [0, 2**31); split longer documents.")
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    documents = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[dtype], len(lengths), len(documents)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(documents.astype("<i8").tobytes())


def _read_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, sequence pointers, document indices) of an `.idx`, checked."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER.size)
    if head.startswith(LEGACY_MAGIC):
        raise IndexedDatasetError(
            f"{idx_path}: Megatron-LM's legacy (non-mmap) index format; re-run preprocessing with "
            "`megalite preprocess` (or Megatron-LM's tools/preprocess_data.py) to get the MMIDIDX format."
        )
    if not MAGIC.startswith(head[: len(MAGIC)]):
        raise IndexedDatasetError(
            f"{idx_path}: not a Megatron MMIDIDX index (it does not start with {MAGIC!r}); "
            "check the --data-path prefix."
        )
    if len(head) < HEADER.size:
        raise IndexedDatasetError(f"{idx_path}: truncated: {size} bytes, shorter than the {HEADER.size}-byte header.")
    _, version, code, num_sequences, num_documents = HEADER.unpack(head)
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: index version {version}, but only version {VERSION} exists.")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (known: 1..8); the file is corrupt.")
    expected = HEADER.size + num_sequences * (4 + 8) + num_documents * 8
    if size < expected:
        raise IndexedDatasetError(
            f"{idx_path}: truncated: the header announces {num_sequences} sequences and {num_documents} document "
            f"indices, {expected} bytes in all, but the file has {size}; re-create the dataset."
        )
    if size > expected:
        hint = " (per-sequence modes of a multimodal dataset, which megalite does not read)" if (
            size == expected + num_sequences) else ""
        raise IndexedDatasetError(
            f"{idx_path}: {size - expected} bytes after the document indices{hint}; expected exactly {expected}."
        )
    if num_documents < 1:
        raise IndexedDatasetError(f"{idx_path}: no document indices; there must be at least the leading 0.")
    mapped = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mapped, dtype="<i4", count=num_sequences, offset=HEADER.size)
    pointers = np.frombuffer(mapped, dtype="<i8", count=num_sequences, offset=HEADER.size + 4 * num_sequences)
    documents = np.frombuffer(mapped, dtype="<i8", count=num_documents, offset=HEADER.size + 12 * num_sequences)

    dtype = DTYPE_CODES[code]
    if num_sequences and lengths.min() < 0:
        raise IndexedDatasetError(f"{idx_path}: sequence {int(np.argmin(lengths))} has a negative length.")
    expected_pointers = np.zeros(num_sequences, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=expected_pointers[1:])
    wrong = np.flatnonzero(pointers != expected_pointers)
    if wrong.size:
        k = int(wrong[0])
        raise IndexedDatasetError(
            f"{idx_path}: sequence {k} starts at byte {int(pointers[k])}, but the sequences before it end at "
            f"byte {int(expected_pointers[k])}; the index is corrupt."
        )
    if documents[0] != 0 or documents[-1] != num_sequences or (np.diff(documents) < 0).any():
        raise IndexedDatasetError(
            f"{idx_path}: document indices must rise from 0 to the sequence count {num_sequences}, but they run "
            f"from {int(documents[0])} to {int(documents[-1])}"
            + (" and decrease somewhere" if (np.diff(documents) < 0).any() else "")
            + "; the index is corrupt (or the writer never called end_document() after its last sequence)."
        )
    return dtype, lengths, pointers, documents


class IndexedDataset:
    """Read-only view of `path_prefix.bin` / `path_prefix.idx` (Megatron-LM's MMIDIDX format).

    `ds[i]` is sequence i as an array of the stored dtype (a view of the memory-mapped `.bin`), `ds[a:b]` a list
    of them, and `ds.get(i, offset, length)` a part of one.
    """

    def __init__(self, path_prefix: str):
        self._open(path_prefix)

    def _open(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path}: no such file; a dataset prefix P names the pair P.bin and P.idx "
                    "(create one with `megalite preprocess --input FILE --output-prefix P`)."
                )
        self.dtype, self.sequence_lengths, self.sequence_pointers, self.document_indices = _read_index(idx_path)
        described = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        actual = os.path.getsize(bin_path)
        if actual != described:
            raise IndexedDatasetError(
                f"{bin_path}: {actual} bytes, but {idx_path} describes {described} bytes of {self.dtype} tokens; "
                "the two files do not belong together (or one is truncated): re-create the dataset."
            )
        self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r") if actual else np.zeros(0, dtype=np.uint8)

    def __getstate__(self) -> str:
        return self.path_prefix  # re-map on unpickling (DataLoader workers) instead of copying the data

    def __setstate__(self, path_prefix: str) -> None:
        self._open(path_prefix)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `idx` (to its end when `length` is None)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"{self.path_prefix}: tokens [{offset}, {offset + length}) are outside sequence {idx} of {size} tokens."
            )
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx: int | np.integer | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            return [self.get(i) for i in range(start, stop, step)]
        return self.get(int(idx))

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(get_idx_path(path_prefix)) and os.path.isfile(get_bin_path(path_prefix))


def _as_tokens(values: Any, dtype: np.dtype) -> np.ndarray:
    """`values` (tensor, array or sequence) as a flat array of `dtype`, refusing values the dtype cannot hold."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values).reshape(-1)
    if array.dtype == dtype:
        return array
    if dtype.kind in "iu":
        if array.size and array.dtype.kind not in "iub":
            raise TypeError(f"cannot store {array.dtype} values as {dtype} token ids; pass integers.")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(
                f"token ids in [{array.min()}, {array.max()}] do not fit in {dtype}; use a wider dtype (int32)."
            )
    return array.astype(dtype)


class IndexedDatasetBuilder:
    """Writes an MMIDIDX dataset: `add_item` sequences, `end_document` after each document's sequences (or
    `add_document`), `add_index` to append a whole dataset, and `finalize(idx_path)` to write the index."""

    def __init__(self, bin_path: str, dtype: Any = np.int32):
        self.dtype = _check_dtype(dtype)
        self._bin_path = bin_path
        self._data = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_item(self, tensor: Any) -> None:
        """Append one sequence."""
        tokens = _as_tokens(tensor, self.dtype)
        self._data.write(tokens.tobytes())
        self.sequence_lengths.append(tokens.size)

    def add_document(self, tensor: Any, lengths: Sequence[int]) -> None:
        """Append a document: the tokens of its sequences back to back, and their lengths."""
        tokens = _as_tokens(tensor, self.dtype)
        if sum(lengths) != tokens.size:
            raise ValueError(f"add_document: lengths sum to {sum(lengths)} but the document has {tokens.size} tokens.")
        self._data.write(tokens.tobytes())
        self.sequence_lengths.extend(int(n) for n in lengths)
        self.end_document()

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one document."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append every document of the dataset at `path_prefix` (same dtype)."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{get_idx_path(path_prefix)}: tokens are {other.dtype}, but this builder writes {self.dtype}; "
                "merge datasets of one dtype."
            )
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        with open(get_bin_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._data)

    def finalize(self, idx_path: str) -> None:
        """Close the `.bin` and write the `.idx`."""
        self._data.close()
        write_index(idx_path, self.dtype, self.sequence_lengths, self.document_indices)
