"""The built-in task of `megalite rl`: its files are deterministic, disjoint and right, and `megalite rl` without
--data-path runs the warm-up and then the RL job on them (here with a 2-step warm-up of a tiny model), evaluating on
the held-out prompts, and a second run reuses the warm-up."""
import json
import re
from collections import Counter

from megalite import cli
from megalite.rl import task


def test_the_task_files_are_deterministic_disjoint_and_right():
    lines = task.task_lines()
    assert lines == task.task_lines() and {k: len(v) for k, v in lines.items()} == task.SIZES
    records = {name: [json.loads(line) for line in v] for name, v in lines.items()}
    questions = [r["prompt"] for v in records.values() for r in v]
    assert len(set(questions)) == len(questions)  # no held-out prompt is seen in the warm-up or by RL
    for name, v in records.items():
        for r in v:
            digits = re.fullmatch(r"Largest digit in (\d{6})\?", r["prompt"]).group(1)
            assert r["answer" if name == "sft" else "label"] == max(digits)
    counts = Counter(r["label"] for r in records["prompts"])
    assert set(counts) == set("3456789") and max(counts.values()) < 2048 / 7 * 1.2  # no dominant answer


def test_megalite_rl_without_data_runs_the_built_in_task(world_of_one, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGALITE_CACHE", str(tmp_path))
    tiny = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--train-iters", "2"]
    monkeypatch.setattr(task, "WARMUP_FLAGS", [*task.WARMUP_FLAGS, *tiny])
    argv = ["rl", "--ppo-step-per-epoch", "1", "--ppo-eval-rollout-global-batch-size", "16",
            "--ppo-eval-sampling-repeat", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "SFT warm-up into" in out and re.search(r"\] +ppo step +1/1 \| iteration 4 \| reward", out)
    assert re.findall(r"eval at ppo step (\d) \| held-out reward", out) == ["0", "1"]
    assert cli.main(argv) == 0
    assert "reusing the SFT warm-up" in capsys.readouterr().out
