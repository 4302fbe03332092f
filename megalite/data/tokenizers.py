"""Tokenizers: the built-in byte-level one, and Hugging Face `tokenizers` for a local tokenizer.json.

Every tokenizer has `vocab_size` (unpadded), `eod` (the end-of-document id), `tokenize(text) -> list[int]`,
`detokenize(ids) -> str`, and `identity`, a string that changes whenever the token ids of a text would
(used to key cached datasets). `train_bpe_tokenizer` trains a byte-level BPE vocabulary on a corpus.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import numpy as np

from megalite.config import DataConfig
from megalite.data.documents import read_documents

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[EOS]")
"""Special tokens taken as the end-of-document token of a Hugging Face tokenizer, first found wins."""

BPE_EOD = "<|endoftext|>"
"""The end-of-document token `train_bpe_tokenizer` adds to the vocabulary."""


class Tokenizer(ABC):
    """Text <-> token ids."""

    vocab_size: int
    """Number of token ids (unpadded)."""
    eod: int
    """End-of-document token id, appended after each document."""
    identity: str
    """Changes whenever the ids of some text would change; keys cached datasets."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document token added)."""

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """The text of token ids (ints, or a NumPy array or tensor of them)."""

    def tokenize_array(self, text: str) -> np.ndarray:
        """`tokenize` as an int64 array (tokenizers override this where an array is cheaper than a list)."""
        return np.asarray(self.tokenize(text), dtype=np.int64)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, end of document 256: no vocabulary file, nothing to download."""

    vocab_size = 257
    eod = 256
    identity = "ByteTokenizer"

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer.json; its end-of-document token is the first of `EOD_CANDIDATES` it has."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--tokenizer-model {path}: no such file; give the path of a Hugging Face tokenizer.json "
                "(or train one with `megalite preprocess --train-tokenizer --vocab-size N`)."
            )
        with open(path, "rb") as f:
            content = f.read()
        try:
            self._tokenizer = HFTokenizer.from_str(content.decode("utf-8"))
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"--tokenizer-model {path}: not a readable Hugging Face tokenizer.json ({e}).") from e
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise ValueError(
                f"--tokenizer-model {path}: the vocabulary has none of the end-of-document tokens "
                f"{', '.join(EOD_CANDIDATES)}; add one as a special token."
            )
        self.path = path
        self.eod = eod
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.identity = "HuggingFaceTokenizer:" + hashlib.sha256(content).hexdigest()

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's [start, end) character span in it."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2's byte-level BPE from Megatron's --vocab-file (gpt2-vocab.json) and --merge-file (gpt2-merges.txt);
    the end of document is <|endoftext|>."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path}: no such file.")
        try:
            tokenizer = HFTokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a GPT-2 BPE vocabulary "
                             f"({e}).") from e
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if BPE_EOD not in vocab:
            raise ValueError(f"--vocab-file {vocab_file}: has no {BPE_EOD} token to end documents with.")
        self.path, self.eod = vocab_file, vocab[BPE_EOD]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        digest = hashlib.sha256()
        for path in (vocab_file, merge_file):
            with open(path, "rb") as f:
                digest.update(f.read())
        self.identity = "GPT2BPETokenizer:" + digest.hexdigest()


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: text is whitespace-separated ids, kept as they are; --vocab-size ids, the last the
    end of document."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod = vocab_size, vocab_size - 1
        self.identity = f"NullTokenizer:{vocab_size}"

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(data_config: DataConfig, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer `--tokenizer-type` (and `--tokenizer-model`, `--vocab-file`/`--merge-file`, or `vocab_size`
    for NullTokenizer) name."""
    if data_config.tokenizer_type == "GPT2BPETokenizer" or (data_config.vocab_file and
                                                            data_config.tokenizer_type == "ByteTokenizer"):
        return GPT2BPETokenizer(data_config.vocab_file, data_config.merge_file)
    if data_config.tokenizer_type == "NullTokenizer":
        if not vocab_size:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size.")
        return NullTokenizer(vocab_size)
    if data_config.tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if data_config.tokenizer_type == "HuggingFaceTokenizer":
        if not data_config.tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH/tokenizer.json.")
        return HuggingFaceTokenizer(data_config.tokenizer_model)
    raise ValueError(f"--tokenizer-type {data_config.tokenizer_type!r}: use ByteTokenizer or HuggingFaceTokenizer.")


def train_bpe_tokenizer(
    files: Sequence[str],
    vocab_size: int,
    output_path: str,
    *,
    json_keys: Sequence[str] = ("text",),
    text_document: str = "file",
) -> HuggingFaceTokenizer:
    """Train a byte-level BPE vocabulary of `vocab_size` ids (with `BPE_EOD`) on `files`, save it as a
    tokenizer.json at `output_path` and return it loaded. Files are read as `megalite preprocess` reads them
    (JSON lines by their `json_keys`, other files as plain text)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs the {len(alphabet)} byte symbols and "
            f"{BPE_EOD}; use at least {len(alphabet) + 1}."
        )
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOD], initial_alphabet=alphabet, show_progress=False
    )
    texts = (text for path in files for text in read_documents(path, json_keys, text_document))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tokenizer.save(output_path)
    return HuggingFaceTokenizer(output_path)
