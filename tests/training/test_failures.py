"""Nothing silent: each way a run used to fail without a word (issue 13's table) now stops early with one message
naming the flag or file and the fix, or continues as promised. Runs `megalite train` in this process (world of one)."""
import re
from pathlib import Path

import pytest

from megalite.cli import main

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--mock-data", "--train-iters", "6",
        "--log-interval", "1", "--lr", "0.003"]


def train(capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["train", *TINY, *flags])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    """The whole of stderr must be one `megalite train: error:` message (no traceback, no usage block)."""
    assert err.startswith("megalite train: error") and "Traceback" not in err and "usage:" not in err, err
    return err


def test_a_non_finite_gradient_stops_the_run_and_saves_nothing(capsys, tmp_path, world_of_one):
    code, out, err = train(capsys, "--lr", "1e12", "--save", str(tmp_path), "--save-interval", "1")
    assert code == 1
    assert re.search(r"iteration \d+: the gradient norm is nan", one_error(err))
    saved = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert saved == ["iter_0000001"]  # the last finite state; the poisoned step is never written
    assert "loss 0.000000e+00" not in out


def test_skipping_instead_of_stopping_logs_no_loss(capsys, world_of_one):
    code, out, _ = train(capsys, "--lr", "1e12", "--train-iters", "3", "--no-check-for-nan-in-loss-and-grad")
    assert code == 0
    assert "loss n/a (every step skipped)" in out and "loss 0.000000e+00" not in out


@pytest.fixture
def checkpoints(capsys, tmp_path, world_of_one) -> Path:
    """Checkpoints at iterations 2 and 4 of a run."""
    code, _, err = train(capsys, "--save", str(tmp_path), "--save-interval", "2", "--exit-interval", "4")
    assert code == 0, err
    return tmp_path


def test_a_flipped_byte_is_refused_naming_the_file_and_the_intact_checkpoint(checkpoints, capsys):
    shard = checkpoints / "iter_0000004" / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) - 200, len(data) - 100, 7):  # inside the tensor data, not the header
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = train(capsys, "--load", str(checkpoints))
    assert code == 1
    assert "does not match its checksum" in one_error(err) and "rank00000.safetensors" in err
    assert "intact earlier checkpoints: 2; load one with --ckpt-step N" in err
    code, out, err = train(capsys, "--load", str(checkpoints), "--ckpt-step", "2")
    assert code == 0, err
    assert "iter_0000002 at iteration 2" in out


@pytest.mark.parametrize("damage", ["truncate", "delete_index"])
def test_a_truncated_shard_or_a_missing_index_is_refused_naming_the_file(damage, checkpoints, capsys):
    newest = checkpoints / "iter_0000004"
    if damage == "truncate":
        shard = newest / "rank00000.safetensors"
        shard.write_bytes(shard.read_bytes()[:1000])
        expected = "rank00000.safetensors"
    else:
        (newest / "index.json").unlink()
        expected = "has no index.json"
    code, _, err = train(capsys, "--load", str(checkpoints))
    assert code == 1 and expected in one_error(err) and "intact earlier checkpoints: 2" in err


def test_a_mistyped_load_path_is_an_error(capsys, tmp_path, world_of_one):
    code, out, err = train(capsys, "--load", str(tmp_path / "typo"))
    assert code == 2 and "--load" in one_error(err) and "check the path" in err
    assert "| loss" not in out  # no step ran


def test_load_equal_to_save_without_a_checkpoint_starts_fresh_and_says_so(capsys, tmp_path, world_of_one):
    code, out, err = train(capsys, "--load", str(tmp_path), "--save", str(tmp_path), "--train-iters", "1")
    assert code == 0, err
    assert "holds no checkpoint yet: starting fresh" in out


def test_a_relaunch_continues_from_its_own_save_whatever_load_says(checkpoints, capsys, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    code, out, err = train(capsys, "--save", str(checkpoints), "--load", str(other))
    assert code == 0, err
    assert "already holds this run's checkpoints: continuing from them" in out
    assert "at iteration 4" in out


def test_resuming_with_another_lr_schedule_is_refused_unless_overridden(checkpoints, capsys):
    code, _, err = train(capsys, "--load", str(checkpoints), "--train-iters", "8")
    assert code == 2 and "--train-iters: checkpoint 6, this run 8" in one_error(err)
    code, out, err = train(capsys, "--load", str(checkpoints), "--train-iters", "8", "--override-opt-param-scheduler")
    assert code == 0, err
    assert " iteration        8/8" in out


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_an_unwritable_save_directory_fails_before_the_first_step(where, capsys, tmp_path, world_of_one):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # /proc refuses new files even to root, who ignores permission bits (the tests may run as root)
    target = {"file": blocker, "under_file": blocker / "sub", "read_only": Path("/proc/megalite-save")}[where]
    code, out, err = train(capsys, "--save", str(target))
    assert code == 2 and f"--save {target}: cannot write there" in one_error(err)
    assert "| loss" not in out  # no step ran


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_tokenizer(capsys, world_of_one):
    code, out, err = train(capsys, "--vocab-size", "50")  # the byte tokenizer's mock data holds ids up to 256
    assert code == 1 and "is outside the vocabulary of 50 ids" in one_error(err) and "ByteTokenizer" in err


def test_an_empty_dataset_is_an_error_naming_the_data(capsys, tmp_path, world_of_one):
    import numpy as np

    from megalite.data import IndexedDatasetBuilder
    from megalite.data.indexed_dataset import get_bin_path, get_idx_path

    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(get_bin_path(prefix), np.uint16).finalize(get_idx_path(prefix))
    code = main(["train", *[f for f in TINY if f != "--mock-data"], "--data-path", prefix])
    err = capsys.readouterr().err
    assert code == 1 and f"the training split of --data-path {prefix} is empty" in one_error(err)


@pytest.mark.parametrize("flags, message", [
    (["--split", "0,100,0"], "the training split of --mock-data is empty (--split 0,100,0"),
    (["--split", "100,0,0", "--eval-interval", "2"], "--eval-interval 2 needs a validation split"),
])
def test_empty_splits_a_flag_needs_are_errors(flags, message, capsys, world_of_one):
    code, _, err = train(capsys, *flags)
    assert code == 1 and message in one_error(err)


def _stops_together(argv: list[str]) -> str:
    from megalite.arguments import parse_args
    from megalite.errors import TrainingError
    from megalite.pretrain import pretrain

    try:
        pretrain(parse_args(argv))
    except TrainingError as e:
        return str(e)
    return "no error"


def test_every_rank_stops_at_the_same_iteration_on_a_non_finite_step(world_of_one):
    """The decision is taken on the global gradient norm, so no rank is left waiting in a collective (bf16, TP2)."""
    from megalite.testing import run_distributed

    argv = [*TINY, "--lr", "1e12", "--bf16", "--tensor-model-parallel-size", "2"]
    messages = run_distributed(2, _stops_together, argv)
    assert messages[0] == messages[1] and re.search(r"iteration \d+: the gradient norm is (nan|inf)", messages[0])
