"""Checkpoints through the real command line: resume reproduces the uninterrupted run bit for bit, a process
SIGKILLed inside a save resumes from the newest complete checkpoint, and mismatched runs are refused."""
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--mock-data", "--train-iters", "6",
        "--log-interval", "1", "--lr", "0.003", "--lr-warmup-iters", "2", "--hidden-dropout", "0.1", "--seed", "5"]

# Runs `megalite train` after making the chosen checkpoint step kill the process with SIGKILL.
KILLER = """
import os, signal, sys
import megalite.checkpoint.state as ckpt
import megalite.checkpoint.store as store
mode, countdown = sys.argv[1], [int(sys.argv[2])]
def die():
    countdown[0] -= 1
    if countdown[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "rank-file":      # after the rank's file is written in the temporary directory, before anything is renamed
    real_save = store.save_file
    def save(tensors, path):
        real_save(tensors, path)
        die()
    store.save_file = save
else:                        # after the checkpoint directory is committed, before `latest` is rewritten
    real_replace = ckpt.os.replace
    def replace(src, dst):
        if str(dst).endswith("latest"):
            die()
        real_replace(src, dst)
    ckpt.os.replace = replace
from megalite.cli import main
main(sys.argv[3:])
"""


def megalite(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(prefix or ["-m", "megalite"]), "train", *TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| loss (\S+) \|", out)]


def final_weights(save_dir: Path) -> dict[str, torch.Tensor]:
    """Every logical tensor of the newest checkpoint: weights and optimizer states."""
    from megalite.checkpoint import read_logical_tensors

    return read_logical_tensors(max(save_dir.glob("iter_*")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    save = tmp_path_factory.mktemp("full")
    run = megalite("--save", str(save))
    assert run.returncode == 0, run.stderr
    return losses(run.stdout), final_weights(save)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(uninterrupted, tmp_path):
    full_losses, full_weights = uninterrupted
    first = megalite("--save", str(tmp_path), "--save-interval", "3", "--exit-interval", "3")
    assert first.returncode == 0, first.stderr
    assert losses(first.stdout) == full_losses[:3]
    second = megalite("--save", str(tmp_path), "--load", str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at iteration 3" in second.stdout
    assert losses(second.stdout) == full_losses[3:]
    _assert_same_weights(final_weights(tmp_path), full_weights)


@pytest.mark.parametrize("mode,countdown", [("rank-file", 2), ("latest", 2)])
def test_sigkill_during_a_save_resumes_from_the_newest_complete_checkpoint(uninterrupted, tmp_path, mode,
                                                                           countdown):
    full_losses, full_weights = uninterrupted
    killed = megalite("--save", str(tmp_path), "--save-interval", "2", prefix=["-c", KILLER, mode, str(countdown)])
    assert killed.returncode == -signal.SIGKILL
    complete = sorted(p.name for p in tmp_path.glob("iter_*") if not p.name.endswith(".tmp"))
    # rank-file: killed while writing iteration 4, so only iteration 2 is complete; latest: iteration 4 was
    # committed but `latest` still says 2.
    assert complete == (["iter_0000002"] if mode == "rank-file" else ["iter_0000002", "iter_0000004"])
    resumed = megalite("--save", str(tmp_path), "--save-interval", "2", "--load", str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    start = int(complete[-1][5:])
    assert losses(resumed.stdout) == full_losses[start:]
    _assert_same_weights(final_weights(tmp_path), full_weights)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_of_another_model_is_refused_with_what_differs(uninterrupted, tmp_path):
    first = megalite("--save", str(tmp_path), "--train-iters", "1")
    assert first.returncode == 0, first.stderr
    other = megalite("--load", str(tmp_path), "--hidden-size", "64")
    assert other.returncode != 0
    assert "hidden_size: checkpoint 32, this run 64" in other.stderr


def test_no_load_optim_no_load_rng_and_finetune(uninterrupted, tmp_path):
    first = megalite("--save", str(tmp_path), "--exit-interval", "3")
    assert first.returncode == 0, first.stderr
    fine = megalite("--load", str(tmp_path), "--finetune")
    assert fine.returncode == 0, fine.stderr
    assert " iteration        1/6" in fine.stdout  # started again from iteration 0
    no_optim = megalite("--load", str(tmp_path), "--no-load-optim", "--no-load-rng")
    assert no_optim.returncode == 0, no_optim.stderr
    assert losses(no_optim.stdout) != uninterrupted[0][3:]  # fresh Adam moments change the trajectory


def _pretrain(argv: list[str]) -> None:
    from megalite.arguments import parse_args
    from megalite.pretrain import pretrain

    pretrain(parse_args(argv))


def test_distributed_optimizer_resumes_bit_for_bit_on_four_ranks(tmp_path):
    """DP=2 x TP=2 with the distributed optimizer, bf16: 6 steps against 3 + resume + 3; the weights and every
    rank's share of the optimizer state (fp32 main weights and moments) end equal."""
    from megalite.testing import run_distributed

    argv = TINY + ["--micro-batch-size", "1", "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
                   "--bf16", "--ddp-bucket-size", "999"]  # the later --micro-batch-size wins
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_distributed(4, _pretrain, argv + ["--save", str(full)])
    run_distributed(4, _pretrain, argv + ["--save", str(parts), "--save-interval", "3", "--exit-interval", "3"])
    run_distributed(4, _pretrain, argv + ["--save", str(parts), "--load", str(parts)])
    a, b = final_weights(full), final_weights(parts)
    _assert_same_weights(a, b)
    assert len([k for k in a if k.endswith(".main")]) == len([k for k in a if not k.startswith("optimizer.")]) > 0
