"""The C++ sample index and blending indices against direct pure-Python constructions."""
import math

import numpy as np
import pytest

from megalite.bench.index import build_sample_index_numpy
from megalite.bench.index import main as bench_main
from megalite.data import build_blending_indices, build_sample_index


def reference_sample_index(sizes, document_index, seq_length, total_tokens, drop_last, extra):
    """Spell out the token stream: sample k is stream tokens [k * seq_length, (k + 1) * seq_length + extra).

    Row k + 1 names the document holding the last token of sample k and the offset, in that document, where
    sample k + 1 starts (the extra token is shared). A short last sample (drop_last False) ends with the stream
    and is recorded as (last document, its length - extra), Megatron-LM's convention.
    """
    where = [(j, t) for j, d in enumerate(document_index) for t in range(sizes[d])]  # stream token -> place
    usable = total_tokens - extra
    num_samples = max(0, usable // seq_length if drop_last else math.ceil(usable / seq_length))
    rows = [(0, 0)]
    for k in range(num_samples):
        end = (k + 1) * seq_length + extra
        if end > len(where):
            rows.append((len(document_index) - 1, sizes[document_index[-1]] - extra))
        else:
            j, t = where[end - 1]
            rows.append((j, t + 1 - extra))
    return np.array(rows, dtype=np.int64)


def random_case(rng):
    num_docs = int(rng.integers(1, 25))
    sizes = rng.integers(0 if rng.random() < 0.3 else 1, rng.choice([3, 10, 40]), size=num_docs, dtype=np.int32)
    if sizes.sum() == 0:
        sizes[0] = 1
    num_epochs = int(rng.integers(1, 4))
    document_index = np.concatenate([rng.permutation(num_docs) for _ in range(num_epochs)])
    seq_length = int(rng.integers(1, 30))
    return sizes, document_index, seq_length, num_epochs, int(sizes.sum())


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sample_index_matches_direct_construction(drop_last, extra):
    rng = np.random.default_rng(1000 * extra + drop_last)
    for case in range(150):
        sizes, docs, seq_length, num_epochs, tokens_per_epoch = random_case(rng)
        docs = docs.astype(np.int32 if case % 2 else np.int64)
        got = build_sample_index(sizes, docs, seq_length, num_epochs, tokens_per_epoch, drop_last, extra)
        want = reference_sample_index(sizes, docs, seq_length, num_epochs * tokens_per_epoch, drop_last, extra)
        assert got.dtype == np.int64 and got.shape == want.shape, case
        np.testing.assert_array_equal(got, want, err_msg=f"case {case}: sizes {sizes} docs {docs} seq {seq_length}")


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("drop_last", [True, False])
def test_numpy_baseline_matches_cpp_on_larger_cases(drop_last, extra):
    rng = np.random.default_rng(7 + extra + 2 * drop_last)
    for _ in range(20):
        sizes = rng.integers(1, 3000, size=int(rng.integers(1, 5000)), dtype=np.int32)
        docs = rng.permutation(len(sizes)).astype(np.int32)
        args = (sizes, docs, int(rng.integers(1, 5000)), 1, int(sizes.sum()), drop_last, extra)
        np.testing.assert_array_equal(build_sample_index(*args), build_sample_index_numpy(*args))


def test_sample_index_of_too_few_tokens_is_only_the_start():
    sizes = np.array([3], dtype=np.int32)
    got = build_sample_index(sizes, np.array([0], dtype=np.int32), 8, 1, 3)
    np.testing.assert_array_equal(got, [[0, 0]])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(sequence_lengths=np.array([3, 4], dtype=np.int64)), TypeError, "sequence_lengths has dtype int64"),
        (dict(sequence_lengths=[3, 4]), TypeError, "sequence_lengths must be a NumPy array"),
        (dict(document_index=np.array([[0, 1]], dtype=np.int32)), ValueError, "document_index must be one-dim"),
        (dict(document_index=np.array([0, 1], dtype=np.uint8)), TypeError, "document_index has dtype uint8"),
        (dict(seq_length=0), ValueError, "seq_length = 0 must be at least 1"),
        (dict(num_epochs=0), ValueError, "num_epochs = 0"),
        (dict(tokens_per_epoch=2.5), TypeError, "tokens_per_epoch must be an integer"),
        (dict(add_extra_token_to_sequence=2), ValueError, "must be 0 or 1"),
        (dict(drop_last_partial_sequence="yes"), TypeError, "must be a bool"),
        (dict(document_index=np.array([0, 2], dtype=np.int32)), ValueError, r"document_index\[1\] = 2 is not a seq"),
        (dict(document_index=np.array([0, -1], dtype=np.int64)), ValueError, r"document_index\[1\] = -1"),
        (dict(sequence_lengths=np.array([3, -4], dtype=np.int32)), ValueError, r"sequence_lengths\[1\] is negative"),
        (dict(tokens_per_epoch=9), ValueError, "holds 7 tokens, fewer than the 9"),
    ],
)
def test_sample_index_rejects_bad_arguments(kwargs, error, message):
    args = dict(sequence_lengths=np.array([3, 4], dtype=np.int32), document_index=np.array([0, 1], dtype=np.int32),
                seq_length=2, num_epochs=1, tokens_per_epoch=7)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        build_sample_index(**args)


def reference_blending(weights, size):
    """Greedy: each sample goes to the first dataset with the largest shortfall weight * max(i, 1) - taken."""
    w = np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).tolist()
    taken = [0] * len(w)
    which, within = [], []
    for i in range(size):
        shortfall = [w[d] * max(i, 1) - taken[d] for d in range(len(w))]
        d = shortfall.index(max(shortfall))
        which.append(d)
        within.append(taken[d])
        taken[d] += 1
    return np.array(which, dtype=np.int16), np.array(within, dtype=np.int64)


def test_blending_indices_match_python_reference():
    rng = np.random.default_rng(3)
    for _ in range(100):
        weights = rng.random(int(rng.integers(1, 7))) * (rng.random() < 0.8 or 0)  # sometimes exact ties
        weights = weights if weights.sum() > 0 else np.ones(len(weights))
        size = int(rng.integers(0, 300))
        which, within = build_blending_indices(weights, size)
        want_which, want_within = reference_blending(weights, size)
        assert which.dtype == np.int16 and within.dtype == np.int64
        np.testing.assert_array_equal(which, want_which)
        np.testing.assert_array_equal(within, want_within)
        counts = np.bincount(which, minlength=len(weights))
        assert np.all(np.abs(counts - weights / weights.sum() * size) <= 2)


@pytest.mark.parametrize("weights, size, message", [
    ([], 4, "1 to 32768 numbers"), ([[1.0]], 4, "1 to 32768"), ([1.0, -1.0], 4, "non-negative"),
    ([0.0, 0.0], 4, "positive sum"), ([float("nan")], 4, "finite"), ([1.0], -1, "size = -1"),
])
def test_blending_indices_reject_bad_arguments(weights, size, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build_blending_indices(weights, size)


def test_benchmark_prints_both_times_and_ratio(capsys):
    assert bench_main(["--num-documents", "2000", "--repeats", "1", "--seq-length", "64"]) == 0
    out = capsys.readouterr().out
    for phrase in ("C++ (megalite._C)", "NumPy (vectorised)", "one streaming pass", "NumPy / C++ =", "identical"):
        assert phrase in out
