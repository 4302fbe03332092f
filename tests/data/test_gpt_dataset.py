"""GPT datasets: sample content, split, epochs, determinism, cache, blending, mock data, the default corpus."""
import dataclasses

import numpy as np
import pytest
import torch

from megalite.config import DataConfig, MegaliteConfig, ModelConfig, TrainingConfig
from megalite.data import BlendedDataset, GPTDataset, IndexedDataset, IndexedDatasetBuilder, build_gpt_datasets
from megalite.data import samples_per_epoch
from megalite.data.gpt_dataset import build_gpt_indices, document_position_ids, parse_split, split_ranges
from megalite.data.tokenizers import ByteTokenizer

EOD = ByteTokenizer.eod


def make_dataset(prefix, num_documents=60, max_length=40, seed=0):
    """Documents of random byte tokens, each ending with EOD; returns them as lists."""
    rng = np.random.default_rng(seed)
    documents = []
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(num_documents):
        doc = [*rng.integers(0, 256, size=int(rng.integers(0, max_length))).tolist(), EOD]
        documents.append(doc)
        builder.add_item(np.array(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return documents


def make_config(data_path, cache, seq_length=16, seed=1234, split="8,1,1", **data):
    return MegaliteConfig(
        model=ModelConfig(seq_length=seq_length),
        training=TrainingConfig(seed=seed),
        data=DataConfig(data_path=data_path, split=split, data_cache_path=str(cache), **data),
    )


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "corpus")
    return prefix, make_dataset(prefix)


def all_tokens(dataset):
    return [dataset.sample_tokens(i).tolist() for i in range(len(dataset))]


def test_samples_are_slices_of_the_shuffled_document_stream(corpus, tmp_path):
    prefix, documents = corpus
    seq = 16
    train, valid, test = build_gpt_datasets(make_config([prefix], tmp_path / "cache", seq), ByteTokenizer(),
                                            (100, 10, 5))
    begin, end = split_ranges(parse_split("8,1,1"), len(documents))[0]
    epochs = len(train.document_index) // (end - begin)
    assert sorted(train.document_index.tolist()) == sorted(list(range(begin, end)) * epochs)
    stream = [t for d in train.document_index for t in documents[d]]
    assert len(train) >= 100
    assert sorted(train.shuffle_index.tolist()) == list(range(len(train)))
    for i in range(len(train)):
        k = int(train.shuffle_index[i])
        sample = train[i]
        assert sample["tokens"].tolist() == stream[k * seq: k * seq + seq]
        assert sample["labels"].tolist() == stream[k * seq + 1: k * seq + seq + 1]
    assert isinstance(valid, GPTDataset) and isinstance(test, GPTDataset)


def test_sample_tensors_have_megatron_shapes_and_dtypes(corpus, tmp_path):
    prefix, _ = corpus
    (train, _, _) = build_gpt_datasets(make_config([prefix], tmp_path / "c", 16), ByteTokenizer(), (8, 0, 0))
    sample = train[3]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sample.items()} == {
        "tokens": (torch.int64, (16,)), "labels": (torch.int64, (16,)), "loss_mask": (torch.float32, (16,)),
        "position_ids": (torch.int64, (16,)),
    }
    assert sample["position_ids"].tolist() == list(range(16))
    assert torch.equal(sample["loss_mask"], torch.ones(16))


def test_eod_mask_loss_masks_positions_whose_input_is_eod(corpus, tmp_path):
    prefix, _ = corpus
    config = make_config([prefix], tmp_path / "c", 16, eod_mask_loss=True)
    (train, _, _) = build_gpt_datasets(config, ByteTokenizer(), (50, 0, 0))
    masked = 0
    for i in range(len(train)):
        s = train[i]
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == EOD)
        masked += int((s["loss_mask"] == 0).sum())
    assert masked > 0


def test_reset_position_ids_restart_after_each_eod_as_megatron_numbers_them(corpus, tmp_path):
    assert document_position_ids(torch.tensor([5, 7, EOD, 3, 4, EOD, EOD, 9]), EOD).tolist() == [0, 1, 2, 0, 1, 2,
                                                                                                 0, 0]
    prefix, _ = corpus
    config = make_config([prefix], tmp_path / "c", 16, reset_position_ids=True)
    (train, _, _) = build_gpt_datasets(config, ByteTokenizer(), (50, 0, 0))
    restarts = 0
    for i in range(len(train)):
        s = train[i]
        tokens, positions = s["tokens"].tolist(), s["position_ids"].tolist()
        for j in range(1, 16):  # Megatron's loop: after an EOD at j - 1, count again from 0
            assert positions[j] == (0 if tokens[j - 1] == EOD else positions[j - 1] + 1)
        restarts += sum(p == 0 for p in positions[1:])
    assert restarts > 0


def test_same_seed_same_samples_and_other_seed_other_order(corpus, tmp_path):
    prefix, _ = corpus
    tok = ByteTokenizer()
    first = build_gpt_datasets(make_config([prefix], tmp_path / "a"), tok, (60, 6, 3))
    again = build_gpt_datasets(make_config([prefix], tmp_path / "b"), tok, (60, 6, 3))  # built anew, elsewhere
    other = build_gpt_datasets(make_config([prefix], tmp_path / "c", seed=99), tok, (60, 6, 3))
    assert not again[0].from_cache
    for a, b in zip(first, again):
        assert all_tokens(a) == all_tokens(b)
    assert all_tokens(first[0]) != all_tokens(other[0])


def test_indices_are_megatrons_random_stream(corpus):
    """Document and shuffle indices come from numpy.random.RandomState(seed), drawn as Megatron-LM draws them."""
    prefix, _ = corpus
    lengths = IndexedDataset(prefix).sequence_lengths
    seed, seq = 5, 16
    document_index, sample_index, shuffle_index = build_gpt_indices(lengths, 10, 50, None, seq, seed)
    rng = np.random.RandomState(seed)
    expected_documents = np.arange(10, 50, dtype=np.int32)
    rng.shuffle(expected_documents)
    np.testing.assert_array_equal(document_index, expected_documents)
    expected_shuffle = np.arange(len(sample_index) - 1, dtype=np.uint32)
    rng.shuffle(expected_shuffle)
    np.testing.assert_array_equal(shuffle_index, expected_shuffle)
    assert len(shuffle_index) == (int(lengths[10:50].sum()) - 1) // seq


def test_a_small_last_epoch_is_shuffled_apart(corpus):
    prefix, _ = corpus
    lengths = IndexedDataset(prefix).sequence_lengths
    tokens, seq = int(lengths[:20].sum()), 8
    num_samples = 2 * tokens // seq + 1  # needs a sample or two of a third epoch
    document_index, _, shuffle_index = build_gpt_indices(lengths, 0, 20, num_samples, seq, 0)
    assert len(document_index) == 60
    assert sorted(document_index[:40].tolist()) == sorted(list(range(20)) * 2)  # two whole epochs, then one
    assert sorted(document_index[40:].tolist()) == list(range(20))
    samples_before_final = (2 * tokens - 1) // seq
    assert sorted(shuffle_index[:samples_before_final].tolist()) == list(range(samples_before_final))
    assert not np.array_equal(document_index[:20], document_index[40:])


def test_second_build_loads_the_cached_indices(corpus, tmp_path):
    prefix, _ = corpus
    config = make_config([prefix], tmp_path / "cache")
    first = build_gpt_datasets(config, ByteTokenizer(), (30, 3, 2))
    second = build_gpt_datasets(config, ByteTokenizer(), (30, 3, 2))
    assert not first[0].from_cache and second[0].from_cache
    assert isinstance(second[0].sample_index, np.memmap)
    assert len(list((tmp_path / "cache").glob("*-GPTDataset-train-description.txt"))) == 1
    assert all_tokens(first[0]) == all_tokens(second[0])
    longer = build_gpt_datasets(config, ByteTokenizer(), (31, 3, 2))  # another sample count: another cache entry
    assert not longer[0].from_cache


def test_default_cache_is_beside_the_data(corpus, tmp_path):
    prefix, _ = corpus
    config = make_config([prefix], tmp_path / "unused")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_cache_path=None))
    build_gpt_datasets(config, ByteTokenizer(), (4, 0, 0))
    assert list((tmp_path / "cache" / "GPTDataset_indices").glob("*-train-sample_index.npy"))


def test_split_ranges_round_like_megatron():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(parse_split("1,1,1"), 10) == [(0, 4), (4, 7), (7, 10)]
    assert split_ranges(parse_split("98/2/0"), 7) == [(0, 7), (7, 7), (7, 7)]


def test_empty_split_or_zero_samples_give_none(corpus, tmp_path):
    prefix, _ = corpus
    datasets = build_gpt_datasets(make_config([prefix], tmp_path / "c", split="9,1,0"), ByteTokenizer(), (5, 0, 5))
    assert datasets[0] is not None and datasets[1] is None and datasets[2] is None


def test_blending_draws_each_prefix_by_weight(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_dataset(a, seed=1)
    make_dataset(b, seed=2)
    config = make_config(["0.25", a, "0.75", b], tmp_path / "c", split="1")
    (train, _, _) = build_gpt_datasets(config, ByteTokenizer(), (200, 0, 0))
    assert isinstance(train, BlendedDataset) and len(train) == 200
    assert np.bincount(train.dataset_index).tolist() == [50, 150]
    alone = {p: build_gpt_datasets(make_config([p], tmp_path / "alone", split="1"), ByteTokenizer(), (n, 0, 0))[0]
             for p, n in ((a, 51), (b, 151))}
    # Each part is the single-prefix dataset of its (margined) size; the blend picks its samples in order.
    for i in (0, 1, 2, 3, 100, 199):
        d, j = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert torch.equal(train[i]["tokens"], train.datasets[d][j]["tokens"])
    assert len(train.datasets[0]) >= 51 and len(train.datasets[1]) >= 151
    assert all_tokens(alone[a]) == all_tokens(train.datasets[0])


def test_mock_data_is_deterministic_and_needs_no_files(tmp_path):
    config = MegaliteConfig(model=ModelConfig(seq_length=32), data=DataConfig(mock_data=True))
    first = build_gpt_datasets(config, ByteTokenizer(), (20, 4, 4))
    second = build_gpt_datasets(config, ByteTokenizer(), (20, 4, 4))
    assert all(d is not None for d in first)
    tokens = np.array([first[0].sample_tokens(i) for i in range(100)])
    assert np.array_equal(tokens, [second[0].sample_tokens(i) for i in range(100)])
    assert tokens.max() <= EOD and (tokens == EOD).any()


def test_samples_per_epoch_counts_the_train_split(corpus, tmp_path):
    prefix, documents = corpus
    config = make_config([prefix], tmp_path / "c", seq_length=16, split="8,1,1")
    begin, end = split_ranges(parse_split("8,1,1"), len(documents))[0]
    tokens = sum(len(d) for d in documents[begin:end])
    assert samples_per_epoch(config, ByteTokenizer()) == (tokens - 1) // 16
    (train, _, _) = build_gpt_datasets(config, ByteTokenizer(), (samples_per_epoch(config, ByteTokenizer()), 0, 0))
    assert len(train.document_index) == end - begin  # exactly one epoch


def test_bad_data_path_names_the_file(tmp_path):
    config = make_config([str(tmp_path / "missing")], tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"missing\.idx: no such file"):
        build_gpt_datasets(config, ByteTokenizer(), (4, 0, 0))


def test_rank_zero_builds_then_the_group_loads(corpus, tmp_path, world_of_one):
    prefix, _ = corpus
    config = make_config([prefix], tmp_path / "c")
    (train, _, _) = build_gpt_datasets(config, ByteTokenizer(), (10, 1, 1))
    assert len(train) >= 10


def test_default_corpus_when_no_data_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGALITE_CACHE", str(tmp_path / "megalite-cache"))
    config = MegaliteConfig(model=ModelConfig(seq_length=64), data=DataConfig())
    (train, valid, test) = build_gpt_datasets(config, ByteTokenizer(), (16, 4, 2))
    assert len(train) >= 16 and valid is not None and test is not None
    assert "corpus" in train.source.path_prefix and "megalite-cache" in train.source.path_prefix
    text = ByteTokenizer().detokenize(train.sample_tokens(0).tolist())
    assert len(text) > 0
