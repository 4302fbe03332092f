"""Reading documents from input files: JSON lines by their keys, plain text as whole files, lines or paragraphs.
Shared by tokenizing (`megalite.data.encode`) and tokenizer training (`megalite.data.tokenizers`).

Nothing is changed silently: invalid UTF-8 and a JSON field that is not a string (null, a number, a list) are errors
naming `file:line`."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
"""Inputs with these suffixes are JSON lines (one object per line); any other file is plain text."""

TEXT_DOCUMENTS = ("file", "line", "paragraph")
"""How plain text splits into documents: a whole file, each line, or blank-line separated blocks (in the last two,
surrounding blank lines and trailing spaces are dropped; blank documents are skipped)."""

Record = tuple[list[str], int]
"""The texts of one input record (one per JSON key) and the input bytes it came from (for progress)."""


def is_json_lines(path: str) -> bool:
    """Whether `path` is read as JSON lines (by its suffix)."""
    return path.endswith(JSON_SUFFIXES)


def _decode(raw: bytes, where: str, offset: int = 0) -> str:
    """UTF-8 text, or an error naming where the first invalid byte is."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: invalid UTF-8 at byte {offset + e.start} ({raw[e.start:e.start + 4]!r}); "
                         "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
               dict: "an object"}


def _json_records(path: str, json_keys: Sequence[str]) -> Iterator[Record]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(_decode(raw, f"{path}:{number}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON object ({e.msg}); JSON-lines input has one per line.")
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number}: a JSON {type(obj).__name__}, expected an object.")
            missing = [key for key in json_keys if key not in obj]
            if missing:
                raise ValueError(
                    f"{path}:{number}: no key {missing[0]!r} (the object has {sorted(obj)[:8]}); "
                    "name the text field with --json-keys."
                )
            for key in json_keys:
                if not isinstance(obj[key], str):
                    raise ValueError(f"{path}:{number}: {key!r} is {_JSON_TYPES.get(type(obj[key]), 'not text')} "
                                     f"({json.dumps(obj[key])[:40]}), expected a string.")
            yield [obj[key] for key in json_keys], len(raw)


def _text_block(lines: list[bytes], where: str) -> Record:
    text = _decode(b"".join(lines), where)
    return [text.lstrip("\r\n").rstrip()], sum(map(len, lines))


def _text_records(path: str, text_document: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        if text_document == "file":
            data = f.read()
            yield [_decode(data, path)], len(data)
            return
        block: list[bytes] = []
        first = 1
        for number, raw in enumerate(f, start=1):
            block.append(raw)
            if text_document == "line" or not raw.strip():  # a line, or a paragraph ended by a blank line
                yield _text_block(block, f"{path}:{first}")
                block, first = [], number + 1
        if block:
            yield _text_block(block, f"{path}:{first}")


def read_records(path: str, json_keys: Sequence[str] = ("text",), text_document: str = "file") -> Iterator[Record]:
    """The records of one input file: JSON lines by `json_keys`, plain text split as `text_document` says."""
    if text_document not in TEXT_DOCUMENTS:
        raise ValueError(f"--text-document {text_document!r}: use one of {', '.join(TEXT_DOCUMENTS)}.")
    if is_json_lines(path):
        return _json_records(path, json_keys)
    return _text_records(path, text_document)


def read_documents(path: str, json_keys: Sequence[str] = ("text",), text_document: str = "file") -> Iterator[str]:
    """Every text of every record of `path`."""
    for texts, _ in read_records(path, json_keys, text_document):
        yield from texts
