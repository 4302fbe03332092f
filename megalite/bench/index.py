"""`megalite bench index`: the C++ sample-index builder against a vectorised NumPy one, in the same run.

Both build the GPT sample index of a shuffled epoch of random-length documents (10 million by default). The
table gives each builder's best time, the ratio, and the C++ builder's time against one streaming pass over the
bytes it must read and write (the sequence lengths, the document index and the sample index), measured here as
a NumPy read of the inputs and a fresh, filled output array.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from megalite.data.indices import build_sample_index
from megalite.parser import Parser


def build_sample_index_numpy(
    sequence_lengths: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """`build_sample_index` in vectorised NumPy: each sample's end is located with a binary search over the
    cumulative document ends (same result, several passes and temporaries)."""
    extra = add_extra_token_to_sequence
    usable = num_epochs * tokens_per_epoch - extra
    if usable <= 0:
        num_samples = 0
    elif drop_last_partial_sequence:
        num_samples = usable // seq_length
    else:
        num_samples = -(-usable // seq_length)
    lengths = sequence_lengths[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    sample_ends = np.minimum(np.arange(1, num_samples + 1, dtype=np.int64) * seq_length + extra, total)
    documents = np.minimum(np.searchsorted(ends, sample_ends, side="left"), len(ends) - 1)
    index = np.zeros((num_samples + 1, 2), dtype=np.int64)
    index[1:, 0] = documents
    index[1:, 1] = sample_ends - extra - (ends[documents] - lengths[documents])
    return index


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _one_pass(inputs: list[np.ndarray], output_shape: tuple[int, int]) -> None:
    """Read every input byte once and write a fresh output array once."""
    for array in inputs:
        np.bitwise_or.reduce(array)
    np.empty(output_shape, dtype=np.int64).fill(1)


def main(argv: list[str]) -> int:
    parser = Parser(prog="megalite bench index", description=__doc__.splitlines()[0])
    parser.add_argument("--num-documents", type=int, default=10_000_000, help="documents in the epoch")
    parser.add_argument("--max-document-length", type=int, default=1024,
                        help="document lengths are uniform in [1, this]")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each builder; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_documents < 1 or args.max_document_length < 1 or args.seq_length < 1 or args.repeats < 1:
        parser.error("--num-documents, --max-document-length, --seq-length and --repeats must be positive.")

    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(1, args.max_document_length + 1, size=args.num_documents, dtype=np.int32)
    docs = rng.permutation(args.num_documents).astype(np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    run = (sizes, docs, args.seq_length, 1, tokens, True, 1)

    cpp = build_sample_index(*run)
    if not np.array_equal(cpp, build_sample_index_numpy(*run)):
        print("ERROR: the C++ and NumPy sample indices differ")
        return 1
    in_order = (sizes, np.arange(args.num_documents, dtype=np.int32), *run[2:])
    t_cpp = _best_time(lambda: build_sample_index(*run), args.repeats)
    t_numpy = _best_time(lambda: build_sample_index_numpy(*run), args.repeats)
    t_in_order = _best_time(lambda: build_sample_index(*in_order), args.repeats)
    t_gather = _best_time(lambda: np.take(sizes, docs), args.repeats)
    t_pass = _best_time(lambda: _one_pass([sizes, docs], cpp.shape), args.repeats)
    moved = sizes.nbytes + docs.nbytes + cpp.nbytes

    def row(name: str, seconds: float) -> str:
        return f"| {name:<34} | {seconds * 1e3:9.1f} | {moved / seconds / 1e9:13.2f} |"

    print(f"sample index: {args.num_documents:,} documents of 1..{args.max_document_length} tokens ({tokens:,} "
          f"tokens), one shuffled epoch, seq_length {args.seq_length}: {len(cpp) - 1:,} samples; outputs identical")
    print(f"bytes read + written: {sizes.nbytes / 1e6:.0f} MB lengths + {docs.nbytes / 1e6:.0f} MB document index"
          f" + {cpp.nbytes / 1e6:.0f} MB sample index = {moved / 1e6:.0f} MB; best of {args.repeats} runs")
    print()
    print(f"| {'builder':<34} | {'time (ms)':>9} | {'GB/s (in+out)':>13} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 15}|")
    print(row("C++ (megalite._C)", t_cpp))
    print(row("NumPy (vectorised)", t_numpy))
    print(row("C++, documents in file order", t_in_order))
    print(row("NumPy lengths[document_index] only", t_gather))
    print(row("one streaming pass over the bytes", t_pass))
    print()
    print(f"NumPy / C++ = {t_numpy / t_cpp:.1f}x; C++ / one streaming pass = {t_cpp / t_pass:.2f}x "
          f"(in file order, where the lengths are read sequentially: {t_in_order / t_pass:.2f}x)")
    return 0
