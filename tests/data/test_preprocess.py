"""`megalite preprocess` on JSON lines and plain text, and the embedded default corpus."""
import json
import os
import sysconfig

import numpy as np
import pytest

from megalite.cli import main as cli_main
from megalite.data.corpus import default_corpus_prefix, stdlib_files
from megalite.data.indexed_dataset import IndexedDataset
from megalite.data.tokenizers import ByteTokenizer, HuggingFaceTokenizer

EOD = ByteTokenizer.eod
TEXTS = [f"document {i}: " + "héllo wörld " * (i % 5) for i in range(300)]


def documents_of(prefix):
    ds = IndexedDataset(prefix)
    return [np.concatenate(ds[int(a):int(b)]).tolist() for a, b in zip(ds.document_indices, ds.document_indices[1:])]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "title": f"t{i}"}) + "\n" for i, t in enumerate(TEXTS)))
    return str(path)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_jsonl_to_indexed_dataset(jsonl, tmp_path, capsys, workers):
    prefix = str(tmp_path / "out" / "ds")
    argv = ["preprocess", "--input", jsonl, "--output-prefix", prefix, "--append-eod", "--workers", workers]
    assert cli_main(argv) == 0
    assert f"{prefix}: 300 documents" in capsys.readouterr().out
    assert IndexedDataset(prefix).dtype == np.uint16
    assert documents_of(prefix) == [list(t.encode()) + [EOD] for t in TEXTS]
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p]


def test_several_json_keys_write_one_dataset_each(jsonl, tmp_path):
    prefix = str(tmp_path / "ds")
    assert cli_main(["preprocess", "--input", jsonl, "--output-prefix", prefix, "--json-keys", "text", "title"]) == 0
    assert documents_of(prefix + "_title") == [list(f"t{i}".encode()) for i in range(len(TEXTS))]
    assert documents_of(prefix + "_text") == [list(t.encode()) for t in TEXTS]


def test_plain_text_documents_by_file_line_or_paragraph(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_text("first line\nsecond line\n\n\nthird\n")
    b.write_text("other file")
    expected = {
        "file": ["first line\nsecond line\n\n\nthird\n", "other file"],
        "line": ["first line", "second line", "third", "other file"],
        "paragraph": ["first line\nsecond line", "third", "other file"],
    }
    for mode, texts in expected.items():
        prefix = str(tmp_path / mode)
        assert cli_main(["preprocess", "--input", str(a), str(b), "--output-prefix", prefix, "--text-document", mode,
                         "--append-eod"]) == 0
        assert documents_of(prefix) == [list(t.encode()) + [EOD] for t in texts], mode


def test_train_tokenizer_then_tokenize_with_it(jsonl, tmp_path, capsys):
    prefix = str(tmp_path / "bpe")
    assert cli_main(["preprocess", "--input", jsonl, "--output-prefix", prefix, "--train-tokenizer", "--vocab-size",
                     "300", "--append-eod", "--workers", "2"]) == 0
    tok = HuggingFaceTokenizer(prefix + ".tokenizer.json")
    assert "--tokenizer-model " + prefix + ".tokenizer.json" in capsys.readouterr().out
    assert documents_of(prefix) == [tok.tokenize(t) + [tok.eod] for t in TEXTS]


@pytest.mark.parametrize("argv, message", [
    (["--input", "nope.jsonl", "--output-prefix", "x"], "--input nope.jsonl: no such file"),
    (["--input", "{jsonl}"], "--input needs --output-prefix"),
    (["--train-tokenizer"], "--train-tokenizer needs --vocab-size"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model"),
    (["--workers", "0"], "--workers 0"),
])
def test_bad_flags_are_named(argv, message, jsonl, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["preprocess", *[a.format(jsonl=jsonl) for a in argv]])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_json_line_is_named_with_its_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    assert cli_main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "bad.jsonl:2: not a JSON object" in capsys.readouterr().err
    path.write_text('{"body": "no text key"}\n')
    assert cli_main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "bad.jsonl:1: no key 'text'" in capsys.readouterr().err
    assert not IndexedDataset.exists(str(tmp_path / "o"))


def test_stdlib_files_are_sorted_sources_without_site_packages():
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    assert len(files) > 500 and all(f.endswith(".py") for f in files)
    assert os.path.join(root, "os.py") in files
    assert not [f for f in files if "site-packages" in f]
    assert files == stdlib_files()


def test_embedded_corpus_builds_once_and_is_the_stdlib(tmp_path):
    prefix = default_corpus_prefix(ByteTokenizer(), cache_dir=str(tmp_path), max_files=40)
    ds = IndexedDataset(prefix)
    files = stdlib_files()[:40]
    assert ds.num_documents == 40
    first = open(files[0], "rb").read().decode("utf-8", errors="replace")
    assert ds[0].tolist() == list(first.encode()) + [EOD]
    mtime = os.path.getmtime(prefix + ".idx")
    assert default_corpus_prefix(ByteTokenizer(), cache_dir=str(tmp_path), max_files=40) == prefix
    assert os.path.getmtime(prefix + ".idx") == mtime


def test_unreadable_files_are_skipped(tmp_path, monkeypatch, capsys):
    import megalite.data.corpus as corpus

    files = stdlib_files()[:5]
    monkeypatch.setattr(corpus, "stdlib_files", lambda: files[:2] + [str(tmp_path / "gone.py")] + files[2:])
    prefix = default_corpus_prefix(ByteTokenizer(), cache_dir=str(tmp_path))
    assert IndexedDataset(prefix).num_documents == 5
    assert "skipped 1 unreadable" in capsys.readouterr().err


def test_preprocess_without_input_builds_the_whole_default_corpus(tmp_path, capsys):
    assert cli_main(["preprocess", "--cache-dir", str(tmp_path)]) == 0
    prefix = capsys.readouterr().out.strip().splitlines()[-1]
    ds = IndexedDataset(prefix)
    non_empty = [f for f in stdlib_files() if os.path.getsize(f)]
    assert ds.num_documents == len(non_empty) and int(ds.sequence_lengths.sum()) > 1_000_000
    assert open(prefix + ".files.txt").read().splitlines() == non_empty


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": null}\n', "bad.jsonl:2: 'text' is null (null), expected a string"),
    (b'{"text": 12345}\n', "bad.jsonl:1: 'text' is a number (12345), expected a string"),
    (b'{"text": "caf\xe9"}\n', "bad.jsonl:1: invalid UTF-8 at byte 13"),
])
def test_values_are_never_changed_silently(content, message, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert cli_main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err
    assert not IndexedDataset.exists(str(tmp_path / "o"))


def test_invalid_utf8_in_plain_text_names_the_line(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"good line\nsecond \xff line\n")
    argv = ["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"), "--text-document", "line"]
    assert cli_main(argv) == 1
    assert "notes.txt:2: invalid UTF-8 at byte 7" in capsys.readouterr().err


def test_an_input_without_documents_is_an_error(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert cli_main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "holds no documents" in capsys.readouterr().err
    assert not IndexedDataset.exists(str(tmp_path / "o"))
