"""The byte tokenizer, Hugging Face tokenizer.json files, and BPE training on a corpus."""
import json

import pytest
import torch

from megalite.config import DataConfig
from megalite.data.tokenizers import BPE_EOD, ByteTokenizer, HuggingFaceTokenizer, build_tokenizer, train_bpe_tokenizer

TEXT = "def f(x):\n    return x * 2  # naïve → ünïcödé ✓\n"


def test_byte_tokenizer_round_trips_utf8():
    tok = build_tokenizer(DataConfig())
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod) == (257, 256)
    ids = tok.tokenize(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.tokenize_array(TEXT).tolist() == ids
    assert tok.detokenize(ids + [tok.eod]) == TEXT
    assert tok.detokenize(torch.tensor(ids)) == TEXT


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200)) + TEXT)
    return train_bpe_tokenizer([str(corpus)], 300, str(tmp / "tokenizer.json")), tmp


def test_trained_bpe_tokenizer_round_trips_and_compresses(trained):
    tok, tmp = trained
    assert tok.vocab_size <= 300
    assert tok.eod == json.loads((tmp / "tokenizer.json").read_text())["added_tokens"][0]["id"]
    for text in (TEXT, "the lazy dog jumps", "unseen 字 text"):
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.detokenize(torch.tensor(tok.tokenize(TEXT))) == TEXT
    assert len(tok.tokenize("the quick brown fox")) < len("the quick brown fox".encode()) / 2
    config = DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp / "tokenizer.json"))
    loaded = build_tokenizer(config)
    assert loaded.tokenize(TEXT) == tok.tokenize(TEXT) and loaded.identity == tok.identity


def test_bpe_training_reads_json_lines_by_key(tmp_path):
    data = tmp_path / "docs.jsonl"
    line = json.dumps({"body": "zebra zebra zebra " * 5, "text": "ignored"}) + "\n"
    data.write_text(line * 50)
    tok = train_bpe_tokenizer([str(data)], 280, str(tmp_path / "t.json"), json_keys=["body"])
    assert len(tok.tokenize("zebra zebra")) <= 3
    assert len(tok.tokenize("ignored")) > 3


def test_tokenizer_identity_follows_the_file(trained, tmp_path):
    tok, tmp = trained
    changed = json.loads((tmp / "tokenizer.json").read_text())
    changed["model"]["vocab"]["zzzz"] = max(changed["model"]["vocab"].values()) + 1
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    assert HuggingFaceTokenizer(str(tmp_path / "changed.json")).identity != tok.identity


def test_tokenizer_errors_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*missing.json: no such file"):
        HuggingFaceTokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable Hugging Face tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path / "junk.json"))
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer(DataConfig(tokenizer_type="HuggingFaceTokenizer"))
    with pytest.raises(ValueError, match="--vocab-size 100 is too small"):
        train_bpe_tokenizer([], 100, str(tmp_path / "t.json"))


def test_tokenizer_without_end_of_document_token_is_refused(trained, tmp_path):
    _, tmp = trained
    content = json.loads((tmp / "tokenizer.json").read_text())
    content["added_tokens"] = []
    del content["model"]["vocab"][BPE_EOD]
    (tmp_path / "no-eod.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="none of the end-of-document tokens"):
        HuggingFaceTokenizer(str(tmp_path / "no-eod.json"))
