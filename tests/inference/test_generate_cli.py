"""`megalite generate`: on a converted tiny Llama (byte tokenizer), --prompt prints the continuation Hugging Face's
greedy `generate` gives; --input/--output write one JSON line per (prompt, sample) with per-line limits, and the same
file on two ranks (TP2); bad input is a one-line error naming the file and line."""
import json

import pytest
import torch

from megalite import cli
from megalite.checkpoint.convert import import_hf
from megalite.data.tokenizers import ByteTokenizer
from megalite.testing import run_distributed
from megalite.testing.hf import make_hf

EOD = ByteTokenizer.eod


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(a megalite checkpoint of a tiny random Llama with the byte tokenizer's 257 ids, the HF model)."""
    root = tmp_path_factory.mktemp("generate")
    hf = make_hf("llama", root / "hf", vocab_size=257)
    import_hf(root / "hf", root / "ckpt")
    return root / "ckpt", hf


def test_prompt_prints_the_greedy_continuation(world_of_one, checkpoint, capsys):
    ckpt, hf = checkpoint
    prompt = "def main("
    assert cli.main(["generate", "--load", str(ckpt), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
    out = hf.generate(torch.tensor([list(prompt.encode())]), do_sample=False, max_new_tokens=12, eos_token_id=EOD,
                      pad_token_id=EOD)[0, len(prompt):].tolist()
    want = ByteTokenizer().detokenize([t for t in out if t != EOD])
    captured = capsys.readouterr()
    assert captured.out == want + "\n"
    assert "model flags from" in captured.err and "tokens/s" in captured.err


def run_cli(argv: list[str]) -> int:
    return cli.main(argv)


def test_input_and_output_files_on_one_and_two_ranks(world_of_one, checkpoint, tmp_path):
    ckpt, _ = checkpoint
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "import os"}) + "\n\n"
                       + json.dumps({"question": "class A:", "max_new_tokens": 3}) + "\n")
    argv = ["generate", "--load", str(ckpt), "--input", str(prompts), "--prompt-key", "question",
            "--max-new-tokens", "6", "--num-samples", "2", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    assert cli.main(argv + ["--output", str(tmp_path / "one.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample_index"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in records:
        limit = 6 if r["prompt_id"] == 0 else 3
        assert len(r["tokens"]) == len(r["logprobs"]) == len(r["sampling_logprobs"]) <= limit
        assert r["finish_reason"] == ("eod" if r["tokens"][-1] == EOD else "length")
        assert r["finish_reason"] == "eod" or len(r["tokens"]) == limit
        assert all(s >= lp - 1e-6 for s, lp in zip(r["sampling_logprobs"], r["logprobs"]))  # top-k/p renormalise
    two = tmp_path / "two.jsonl"
    assert run_distributed(2, run_cli, argv + ["--output", str(two), "--tensor-model-parallel-size", "2"]) == [0, 0]
    for got, want in zip([json.loads(line) for line in two.read_text().splitlines()], records, strict=True):
        assert got["tokens"] == want["tokens"]
        assert got["logprobs"] == pytest.approx(want["logprobs"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("line, message", [
    ("not json", "prompts.jsonl:1: not JSON"),
    ('{"text": "x"}', "prompts.jsonl:1: no string field 'prompt' (set --prompt-key)"),
    ('{"prompt": "x", "max_new_tokens": 0}', "prompts.jsonl:1: max_new_tokens must be a positive integer"),
    ('{"prompt": ""}', "prompts.jsonl:1: the prompt has no tokens"),
])
def test_bad_input_lines_name_the_file_and_line(world_of_one, checkpoint, tmp_path, capsys, line, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(line + "\n")
    assert cli.main(["generate", "--load", str(checkpoint[0]), "--input", str(prompts)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "x"], "--load CKPT_OR_HF_DIR is required"),
    (["--load", "LOAD"], "nothing to generate: give --prompt TEXT or --input prompts.jsonl"),
    (["--load", "LOAD", "--prompt", "x", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    (["--load", "LOAD", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--load", "/nonexistent", "--prompt", "x"], "neither a megalite checkpoint"),
    (["--load", "HF", "--prompt", "x"], "has no tokenizer.json: give the model's tokenizer with --tokenizer-type"),
])
def test_bad_flags_are_one_line_errors(world_of_one, checkpoint, capsys, flags, message):
    paths = {"LOAD": str(checkpoint[0]), "HF": str(checkpoint[0].parent / "hf")}
    argv = [paths.get(f, f) for f in flags]
    assert cli.main(["generate"] + argv) in (1, 2)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
