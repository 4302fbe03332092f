"""Logs like the tools people know: time and rank on every line, the data at start-up, an ETA, a line per saved
checkpoint, an end-of-run summary, TensorBoard and Weights & Biases (offline) scalars."""
import re

from megalite.cli import main

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--mock-data", "--train-iters", "4",
        "--log-interval", "2", "--lr", "0.003", "--eval-interval", "2", "--eval-iters", "1"]


def test_a_run_logs_time_rank_data_eta_checkpoints_and_a_summary(capsys, tmp_path, monkeypatch, world_of_one):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code = main(["train", *TINY, "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                 "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "megalite-test",
                 "--wandb-exp-name", "tiny", "--wandb-save-dir", str(tmp_path / "wandb"), "--peak-tflops", "1000"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if "[rank 0]" in line]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] ", line) for line in lines)
    assert any("data: --mock-data, tokenizer ByteTokenizer; train" in line for line in lines)
    assert len([line for line in lines if re.search(r"\| ETA \d+:\d\d:\d\d", line)]) == 2
    assert len([line for line in lines if re.search(r"\| TFLOP/s per device [\d.e+-]+ \| MFU [\d.]+%", line)]) == 2
    saved = [line for line in lines if "saved checkpoint" in line]
    assert len(saved) == 2 and re.search(r"iter_0000004 in [\d.]+ s \([\d.]+ MiB\)", saved[-1])
    summary = lines[-1]
    assert re.search(r"run finished: iterations 0 -> 4, 512 tokens in \d+:\d\d:\d\d; last train loss [\d.]+, "
                     r"last validation loss [\d.]+; checkpoint .*iter_0000004", summary), summary
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").rglob("*.wandb"))
