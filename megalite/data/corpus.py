"""The embedded default corpus: the Python source files of the running interpreter's standard library.

Every machine that runs megalite has it, so `megalite train` needs no download. It is tokenized once per
tokenizer into an indexed dataset under the megalite cache ($MEGALITE_CACHE, else ~/.cache/megalite).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

from megalite.data.documents import Record
from megalite.data.encode import encode_to_datasets
from megalite.data.indexed_dataset import IndexedDataset
from megalite.data.tokenizers import ByteTokenizer, Tokenizer

EXCLUDED_DIRECTORIES = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Folders of the stdlib tree that hold installed packages or bytecode, not the standard library."""

CORPUS_FORMAT = 2
"""Bump when the way the corpus is built changes, so that old caches are not reused."""


def default_cache_dir() -> str:
    """$MEGALITE_CACHE, else ~/.cache/megalite."""
    return os.environ.get("MEGALITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megalite")


def stdlib_files(stdlib: str | None = None) -> list[str]:
    """The standard library's .py files (without installed packages), sorted by their path within it."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in EXCLUDED_DIRECTORIES]
        found += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda path: os.path.relpath(path, root).split(os.sep))


def _records(files: list[str], skipped: list[str], included: list[str]) -> Iterator[Record]:
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            skipped.append(path)
            continue
        if data:
            included.append(path)
            yield [data.decode("utf-8", errors="replace")], len(data)


def default_corpus_prefix(tokenizer: Tokenizer, cache_dir: str | None = None, max_files: int | None = None) -> str:
    """The prefix of the embedded corpus tokenized by `tokenizer`, building it on the first call.

    One document per non-empty stdlib .py file (in sorted path order) with the end-of-document token appended;
    files that cannot be read are skipped. `max_files` keeps only the first files (for quick tests). The files
    behind the documents are listed, in order, in PREFIX.files.txt.
    """
    files = stdlib_files()[:max_files]
    key = json.dumps(
        {"format": CORPUS_FORMAT, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"],
         "files": len(files), "tokenizer": tokenizer.identity},
        sort_keys=True,
    )
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    prefix = os.path.join(cache_dir or default_cache_dir(), "corpus", name)
    if IndexedDataset.exists(prefix):
        return prefix
    if not files:
        raise FileNotFoundError(
            f"no .py files under {sysconfig.get_paths()['stdlib']}: this interpreter ships no standard-library "
            "sources; give --data-path (or --mock-data)."
        )
    skipped: list[str] = []
    included: list[str] = []
    # The byte tokenizer is faster in-process than the cost of shipping text to workers and back.
    workers = 1 if isinstance(tokenizer, ByteTokenizer) else min(8, os.cpu_count() or 1)
    total = sum(os.path.getsize(path) for path in files if os.path.isfile(path))
    encode_to_datasets(
        _records(files, skipped, included), tokenizer, [prefix], append_eod=True, workers=workers, total_bytes=total,
        label=f"building the embedded corpus ({len(files)} stdlib files)",
    )
    if skipped:
        print(f"embedded corpus: skipped {len(skipped)} unreadable files, e.g. {skipped[0]}", file=sys.stderr)
    with open(prefix + ".files.txt", "w") as f:
        f.write("".join(f"{path}\n" for path in included))
    return prefix
