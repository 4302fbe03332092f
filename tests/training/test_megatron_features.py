"""Megatron-LM flags megalite honours, run for real: --apply-layernorm-1p, --exit-duration-in-mins, --profile, GPT-2's
BPE from --vocab-file/--merge-file, NullTokenizer, and the start-up list of flags without effect."""
import re

from megalite.cli import main
from megalite.testing.reference import assert_matches_single_process

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--mock-data", "--train-iters", "3",
        "--log-interval", "1", "--lr", "0.003"]


def _losses(out: str) -> list[str]:
    return re.findall(r"\| loss (\S+) \|", out)


def test_zero_centred_norms_train_exactly_like_plain_ones(capsys, world_of_one):
    """1 + w with w starting at 0 is the plain norm at every step (norm weights take no weight decay)."""
    assert main(["train", *TINY]) == 0
    plain = _losses(capsys.readouterr().out)
    assert main(["train", *TINY, "--apply-layernorm-1p"]) == 0
    assert _losses(capsys.readouterr().out) == plain and len(plain) == 3


def test_zero_centred_norms_under_tp2_sp_match_one_process(world_of_one):
    assert_matches_single_process(2, [*TINY[:8], "--vocab-size", "128", "--global-batch-size", "4",
                                      "--micro-batch-size", "4", "--apply-layernorm-1p", "--qk-layernorm",
                                      "--tensor-model-parallel-size", "2", "--sequence-parallel"])


def test_exit_duration_stops_and_saves(capsys, tmp_path, world_of_one):
    assert main(["train", *TINY, "--train-iters", "50", "--exit-duration-in-mins", "1e-6", "--save",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "--exit-duration-in-mins 1e-06 reached at iteration 1" in out
    assert (tmp_path / "iter_0000001").is_dir()


def test_profile_writes_a_chrome_trace(capsys, tmp_path, world_of_one):
    assert main(["train", *TINY, "--profile", "--profile-step-start", "2", "--profile-step-end", "3",
                 "--tensorboard-dir", str(tmp_path)]) == 0
    assert "profiled iterations 2..3" in capsys.readouterr().out
    assert list(tmp_path.glob("profile-iter2-3-rank0.json"))


def test_gpt2_bpe_from_vocab_and_merge_files_and_the_null_tokenizer(capsys, tmp_path, world_of_one):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the quick brown fox"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    vocab, merges = bpe.save_model(str(tmp_path))
    assert main(["train", *TINY, "--vocab-file", vocab, "--merge-file", merges]) == 0
    out = capsys.readouterr().out
    assert "tokenizer GPT2BPETokenizer" in out and len(_losses(out)) == 3
    assert main(["train", *TINY, "--tokenizer-type", "NullTokenizer", "--vocab-size", "300",
                 "--use-mcore-models", "--manual-gc"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: 300 tokens" in out and len(_losses(out)) == 3
    assert "accepted with no effect in megalite (see megalite train --help): --use-mcore-models, --manual-gc" in out
