"""`megalite preprocess`: JSON lines or plain text -> Megatron indexed dataset (.bin/.idx).

With no --input it builds the embedded default corpus (the interpreter's standard library) and prints its
prefix. --train-tokenizer first trains a byte-level BPE vocabulary of --vocab-size ids on the input itself.
"""
from __future__ import annotations

import argparse
import os
import sys

from megalite.config import DataConfig
from megalite.data.corpus import default_cache_dir, default_corpus_prefix, stdlib_files
from megalite.data.documents import TEXT_DOCUMENTS, is_json_lines, read_records
from megalite.data.encode import encode_to_datasets
from megalite.data.tokenizers import Tokenizer, build_tokenizer, train_bpe_tokenizer
from megalite.parser import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="megalite preprocess",
        description="Tokenize JSON lines (.jsonl/.json/.ndjson) or plain text into a Megatron indexed dataset "
        "PREFIX.bin/PREFIX.idx for --data-path. Without --input: build the embedded default corpus.",
    )
    parser.add_argument("--input", nargs="+", metavar="FILE", help="input files, read in the order given")
    parser.add_argument("--output-prefix", help="write OUTPUT_PREFIX.bin and .idx (with several --json-keys: "
                        "OUTPUT_PREFIX_KEY.bin/.idx per key)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize (default: text)")
    parser.add_argument("--text-document", choices=TEXT_DOCUMENTS, default="file",
                        help="plain text: one document per file, per non-empty line, or per blank-line separated "
                        "paragraph (default: file)")
    parser.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="tokenizer processes (default: CPU count, at most 8)")
    parser.add_argument("--tokenizer-type", choices=["ByteTokenizer", "HuggingFaceTokenizer"], default="ByteTokenizer",
                        help="the built-in byte tokenizer, or a Hugging Face tokenizer.json (--tokenizer-model)")
    parser.add_argument("--tokenizer-model", help="path of the Hugging Face tokenizer.json (with --train-tokenizer: "
                        "where to write the trained one; default OUTPUT_PREFIX.tokenizer.json)")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train a byte-level BPE tokenizer of --vocab-size ids on the input, then use it")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size of --train-tokenizer")
    parser.add_argument("--cache-dir", help="cache of the embedded corpus (default: $MEGALITE_CACHE, else "
                        "~/.cache/megalite)")
    return parser


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the flags, phrased as the fix, or None."""
    if args.input:
        missing = [path for path in args.input if not os.path.isfile(path)]
        if missing:
            return f"--input {missing[0]}: no such file."
        if not args.output_prefix:
            return "--input needs --output-prefix PREFIX (the dataset is written to PREFIX.bin and PREFIX.idx)."
        if len(args.json_keys) > 1 and not all(map(is_json_lines, args.input)):
            return "several --json-keys need JSON-lines input (.jsonl/.json/.ndjson) only; plain text has no keys."
    if args.workers < 1:
        return f"--workers {args.workers} must be at least 1."
    if args.train_tokenizer and not args.vocab_size:
        return "--train-tokenizer needs --vocab-size N."
    if args.vocab_size and not args.train_tokenizer:
        return "--vocab-size is only used with --train-tokenizer; add it, or drop --vocab-size."
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model and not args.train_tokenizer:
        return "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH/tokenizer.json."
    return None


def _tokenizer(args: argparse.Namespace) -> Tokenizer:
    if not args.train_tokenizer:
        return build_tokenizer(DataConfig(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model))
    if args.input:
        files, keys = args.input, args.json_keys
        output = args.tokenizer_model or f"{args.output_prefix}.tokenizer.json"
    else:
        files, keys = stdlib_files(), ("text",)
        output = args.tokenizer_model or os.path.join(
            args.cache_dir or default_cache_dir(), "tokenizers", f"stdlib-bpe-{args.vocab_size}.json")
    print(f"training a BPE tokenizer of {args.vocab_size} ids on {len(files)} files ...", file=sys.stderr)
    tokenizer = train_bpe_tokenizer(files, args.vocab_size, output, json_keys=keys, text_document=args.text_document)
    print(f"tokenizer: {output} (use --tokenizer-type HuggingFaceTokenizer --tokenizer-model {output})")
    return tokenizer


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        parser.error(problem)
    try:
        tokenizer = _tokenizer(args)
        if not args.input:
            print(default_corpus_prefix(tokenizer, cache_dir=args.cache_dir))
            return 0
        keys = args.json_keys
        prefixes = [args.output_prefix] if len(keys) == 1 else [f"{args.output_prefix}_{key}" for key in keys]
        records = (r for path in args.input for r in read_records(path, keys, args.text_document))
        summaries = encode_to_datasets(
            records, tokenizer, prefixes, append_eod=args.append_eod, workers=args.workers,
            total_bytes=sum(os.path.getsize(path) for path in args.input),
        )
    except (OSError, ValueError) as e:
        print(f"megalite preprocess: {e}", file=sys.stderr)
        return 1
    if not any(s.documents for s in summaries):
        for s in summaries:
            for path in (f"{s.prefix}.bin", f"{s.prefix}.idx"):
                if os.path.exists(path):
                    os.remove(path)
        print(f"megalite preprocess: --input {' '.join(args.input)} holds no documents (empty files or only blank "
              "lines/texts); nothing written.", file=sys.stderr)
        return 1
    for s in summaries:
        print(f"{s.prefix}: {s.documents} documents, {s.tokens} tokens (use --data-path {s.prefix})")
    return 0
