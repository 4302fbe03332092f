"""MMIDIDX .bin/.idx: byte-exact format, round trips and cross-reads for every dtype, clear errors on bad files."""
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from megalite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError

# Megatron-LM's dtype codes, written out independently of the module under test.
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def random_documents(rng, dtype, num_documents=7):
    """Documents as lists of sequences, values spanning the dtype's range."""
    if np.dtype(dtype).kind == "f":
        values = lambda n: rng.standard_normal(n).astype(dtype)  # noqa: E731
    else:
        info = np.iinfo(dtype)
        values = lambda n: rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)  # noqa: E731
    return [[values(int(rng.integers(0, 9))) for _ in range(int(rng.integers(1, 4)))] for _ in range(num_documents)]


def write_with_builder(prefix, dtype, documents):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for sequences in documents:
        for sequence in sequences:
            builder.add_item(torch.from_numpy(sequence))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def write_like_megatron(prefix, code, documents):
    """An independent writer following Megatron-LM's _IndexWriter: header, lengths, pointers, document indices."""
    dtype = np.dtype(CODES[code])
    sequences = [s for doc in documents for s in doc]
    lengths = [len(s) for s in sequences]
    pointers = [sum(lengths[:i]) * dtype.itemsize for i in range(len(lengths))]
    doc_indices = [0]
    for doc in documents:
        doc_indices.append(doc_indices[-1] + len(doc))
    with open(prefix + ".bin", "wb") as f:
        for s in sequences:
            f.write(np.asarray(s, dtype=dtype.newbyteorder("<")).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_indices)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_indices)}q", *doc_indices))


def read_like_megatron(prefix):
    """An independent reader following Megatron-LM's _IndexReader: (dtype, sequences, document indices)."""
    idx = open(prefix + ".idx", "rb").read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", idx, 9)
    (code,) = struct.unpack_from("<B", idx, 17)
    count, doc_count = struct.unpack_from("<QQ", idx, 18)
    assert version == 1
    offset = 34
    lengths = struct.unpack_from(f"<{count}i", idx, offset)
    pointers = struct.unpack_from(f"<{count}q", idx, offset + 4 * count)
    doc_indices = struct.unpack_from(f"<{doc_count}q", idx, offset + 12 * count)
    data = open(prefix + ".bin", "rb").read()
    dtype = np.dtype(CODES[code])
    sequences = [np.frombuffer(data, dtype=dtype, count=n, offset=p) for n, p in zip(lengths, pointers)]
    return dtype, sequences, list(doc_indices)


def test_index_file_is_byte_exact_megatron_format(tmp_path):
    prefix = str(tmp_path / "ds")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder.add_item(torch.tensor([1, 2, 3]))
    builder.add_item(torch.tensor([4]))
    builder.end_document()
    builder.add_item(torch.tensor([5, 65535]))
    builder.end_document()
    builder.finalize(prefix + ".idx")

    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 3)  # sequences
        + struct.pack("<Q", 3)  # document indices (2 documents + 1)
        + struct.pack("<3i", 3, 1, 2)  # lengths
        + struct.pack("<3q", 0, 6, 8)  # byte pointers
        + struct.pack("<3q", 0, 2, 3)  # document indices
    )
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 4, 5, 65535)


@pytest.mark.parametrize("code", sorted(CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = CODES[code]
    documents = random_documents(np.random.default_rng(code), dtype)
    prefix = str(tmp_path / "ds")
    write_with_builder(prefix, dtype, documents)

    ds = IndexedDataset(prefix)
    sequences = [s for doc in documents for s in doc]
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(sequences)
    assert ds.num_documents == len(documents)
    for i, s in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], s)
    for got, want in zip(ds[1:5], sequences[1:5]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("code", sorted(CODES))
def test_cross_read_with_independent_megatron_style_reader_and_writer(tmp_path, code):
    dtype = CODES[code]
    documents = random_documents(np.random.default_rng(100 + code), dtype)
    sequences = [s for doc in documents for s in doc]

    ours = str(tmp_path / "ours")
    write_with_builder(ours, dtype, documents)
    got_dtype, got_sequences, got_doc_indices = read_like_megatron(ours)
    assert got_dtype == np.dtype(dtype)
    assert got_doc_indices == list(np.cumsum([0] + [len(d) for d in documents]))
    for got, want in zip(got_sequences, sequences, strict=True):
        np.testing.assert_array_equal(got, want)

    theirs = str(tmp_path / "theirs")
    write_like_megatron(theirs, code, documents)
    assert (tmp_path / "theirs.idx").read_bytes() == (tmp_path / "ours.idx").read_bytes()
    assert (tmp_path / "theirs.bin").read_bytes() == (tmp_path / "ours.bin").read_bytes()
    ds = IndexedDataset(theirs)
    for i, s in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], s)


def test_get_reads_a_view_of_part_of_a_sequence(tmp_path):
    prefix = str(tmp_path / "ds")
    write_with_builder(prefix, np.int32, [[np.arange(10, dtype=np.int32)], [np.arange(100, 105, dtype=np.int32)]])
    ds = IndexedDataset(prefix)
    part = ds.get(1, offset=2, length=2)
    np.testing.assert_array_equal(part, [102, 103])
    assert not part.flags.owndata  # a view of the memory map, not a copy of the file
    np.testing.assert_array_equal(ds.get(0, offset=7), [7, 8, 9])
    with pytest.raises(IndexError, match="outside sequence 1"):
        ds.get(1, offset=3, length=3)


def test_empty_dataset_round_trips(tmp_path):
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin", np.uint16).finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0


def test_pickled_dataset_maps_the_files_again(tmp_path):
    prefix = str(tmp_path / "ds")
    write_with_builder(prefix, np.int64, [[np.arange(1000, dtype=np.int64)]])
    blob = pickle.dumps(IndexedDataset(prefix))
    assert len(blob) < 1000  # the prefix, not the tokens
    np.testing.assert_array_equal(pickle.loads(blob)[0], np.arange(1000))


def test_add_index_merges_datasets(tmp_path):
    a, b, merged = (str(tmp_path / name) for name in ("a", "b", "merged"))
    docs_a = random_documents(np.random.default_rng(1), np.uint16, 3)
    docs_b = random_documents(np.random.default_rng(2), np.uint16, 4)
    write_with_builder(a, np.uint16, docs_a)
    write_with_builder(b, np.uint16, docs_b)
    builder = IndexedDatasetBuilder(merged + ".bin", np.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(merged + ".idx")

    direct = str(tmp_path / "direct")
    write_with_builder(direct, np.uint16, docs_a + docs_b)
    assert (tmp_path / "merged.idx").read_bytes() == (tmp_path / "direct.idx").read_bytes()
    assert (tmp_path / "merged.bin").read_bytes() == (tmp_path / "direct.bin").read_bytes()


def test_add_document_is_add_items_then_end_document(tmp_path):
    one, other = str(tmp_path / "one"), str(tmp_path / "other")
    builder = IndexedDatasetBuilder(one + ".bin", np.int32)
    builder.add_document(torch.tensor([1, 2, 3, 4, 5]), [2, 3])
    builder.finalize(one + ".idx")
    write_with_builder(other, np.int32, [[np.array([1, 2], np.int32), np.array([3, 4, 5], np.int32)]])
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "other.idx").read_bytes()


def test_builder_refuses_ids_its_dtype_cannot_hold(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "ds.bin"), np.uint16)
    with pytest.raises(ValueError, match="do not fit in uint16"):
        builder.add_item(torch.tensor([1, 70000]))
    with pytest.raises(TypeError, match="float"):
        builder.add_item(np.array([1.5]))
    with pytest.raises(TypeError, match="complex"):
        IndexedDatasetBuilder(str(tmp_path / "c.bin"), np.complex64)


def test_add_index_refuses_another_dtype(tmp_path):
    a = str(tmp_path / "a")
    write_with_builder(a, np.int32, [[np.arange(3, dtype=np.int32)]])
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"a\.idx.*int32.*uint16"):
        builder.add_index(a)


# --- bad files: each error names the file and what is wrong ---------------------------------------------------


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "ds")
    write_with_builder(prefix, np.uint16, [[np.arange(5, dtype=np.uint16)], [np.arange(3, dtype=np.uint16)] * 2])
    return prefix


def corrupt(path, offset, data):
    content = bytearray(open(path, "rb").read())
    content[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(content))


def test_missing_file_names_it_and_the_fix(good):
    import os

    os.remove(good + ".bin")
    with pytest.raises(FileNotFoundError, match=r"ds\.bin: no such file.*megalite preprocess"):
        IndexedDataset(good)


@pytest.mark.parametrize(
    "offset, data, message",
    [
        (0, b"NOTANIDX\x00", "not a Megatron MMIDIDX index"),
        (0, b"TNTIDX\x00\x00", "legacy"),
        (9, struct.pack("<Q", 2), "version 2"),
        (17, struct.pack("<B", 9), "unknown dtype code 9"),
        (18, struct.pack("<Q", 4), "truncated"),  # one more sequence than the file holds
        (26, struct.pack("<Q", 2), "bytes after the document indices"),  # one document index fewer
        (34, struct.pack("<i", -1), "negative length"),
        (34 + 12 + 8, struct.pack("<q", 4), "sequence 1 starts at byte 4"),  # second pointer
        (34 + 36, struct.pack("<q", 1), "document indices must rise"),  # first document index
        (34 + 36 + 16, struct.pack("<q", 2), "document indices must rise"),  # last document index
    ],
)
def test_corrupt_index_gives_clear_error(good, offset, data, message):
    corrupt(good + ".idx", offset, data)
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(good)
    assert "ds.idx" in str(info.value)


def test_truncated_index_gives_clear_error(good):
    for keep in (0, 5, 20, 60):
        content = open(good + ".idx", "rb").read()
        open(good + ".idx", "wb").write(content[:keep])
        with pytest.raises(IndexedDatasetError, match=r"ds\.idx: truncated"):
            IndexedDataset(good)


def test_truncated_bin_gives_clear_error(good):
    content = open(good + ".bin", "rb").read()
    open(good + ".bin", "wb").write(content[:-2])
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin: 20 bytes, but .*ds\.idx describes 22 bytes"):
        IndexedDataset(good)


def test_bin_of_another_dataset_gives_clear_error(good, tmp_path):
    other = str(tmp_path / "other")
    write_with_builder(other, np.uint16, [[np.arange(50, dtype=np.uint16)]])
    shutil.copy(other + ".bin", good + ".bin")
    with pytest.raises(IndexedDatasetError, match="do not belong together"):
        IndexedDataset(good)
