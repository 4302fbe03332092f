"""The built-in task of `megalite rl` (run when no --data-path is given): no download, CPU, a few minutes.

"Largest digit in 381724?" -> "8". A small byte-level GPT (the default shape of `megalite train`) gets a short SFT
warm-up on such conversations (`megalite train --sft`, enough to learn the answer's form and part of the skill), then
GRPO on other prompts of the task with the rule reward (exact match of the final answer), evaluated on held-out
prompts (none seen in the warm-up or by RL) before the first PPO step, every 10 and after the last: the held-out
reward before RL is the warm-up's, the rise after it is RL's own (README: the numbers of a run).

The task's files (conversations, prompts, held-out prompts; deterministic) and the warm-up checkpoint live under
$MEGALITE_CACHE/rl-task (else ~/.cache/megalite/rl-task), keyed by the task's flags; a later run reuses the warm-up.
The user's flags follow the task's RL flags (so they win) and apply to the RL phase; the model's shape is the
warm-up's.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from megalite.checkpoint.state import latest_iteration
from megalite.data.corpus import default_cache_dir

DIGITS = 6
"""Digits per question."""
LARGEST = (3, 9)
"""The range of answers, drawn uniformly (wide enough that every answer has thousands of distinct questions)."""
SIZES = {"sft": 4000, "prompts": 2048, "held_out": 128}

WARMUP_FLAGS = ("--sft --sft-answer-key answer --reset-attention-mask --reset-position-ids --seq-length 64 "
                "--train-iters 100 --log-interval 20 --eval-interval 1000 --seed 1234").split()
"""`megalite train` flags of the warm-up (the default model shape; --data-path and --save are added)."""

RL_FLAGS = ("--use-grpo --seq-length 64 --ppo-resp-seq-len 8 --ppo-rollout-global-batch-size 16 "
            "--ppo-sampling-repeat 8 --ppo-sampling-keep 8 --global-batch-size 32 --ppo-step-per-epoch 80 "
            "--grpo-kl-loss-beta 0.001 --lr 5e-4 --lr-decay-style constant --ppo-step-eval-interval 10 "
            "--ppo-eval-rollout-global-batch-size 128 --ppo-eval-sampling-repeat 4 --seed 1234").split()
"""`megalite rl` flags of the task (--load, --data-path and --ppo-eval-data-path are added)."""


def question(rng: random.Random) -> tuple[str, str]:
    """A question and its answer, the answer uniform over LARGEST (so that no constant answer scores over 1/7)."""
    largest = rng.randint(*LARGEST)
    digits = [rng.randint(0, largest) for _ in range(DIGITS)]
    digits[rng.randrange(DIGITS)] = largest
    return f"Largest digit in {''.join(map(str, digits))}?", str(largest)


def task_lines() -> dict[str, list[str]]:
    """The JSON lines of the three files: each question at most once over all of them (seeded)."""
    rng, seen = random.Random(0), set()
    lines: dict[str, list[str]] = {}
    for name, count in SIZES.items():
        out = lines[name] = []
        while len(out) < count:
            text, answer = question(rng)
            if text in seen:
                continue
            seen.add(text)
            out.append(json.dumps({"prompt": text, "answer" if name == "sft" else "label": answer}))
    return lines


def _write(path: Path, text: str) -> None:
    """Write atomically unless the file already holds `text` (every rank of a launch writes the same files)."""
    if path.is_file() and path.read_text() == text:
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def prepare(root: str | None = None) -> dict[str, str]:
    """The task's files and warm-up checkpoint directory: paths by name (sft, prompts, held_out, warmup)."""
    files = task_lines()
    key = hashlib.sha256(json.dumps([files, WARMUP_FLAGS]).encode()).hexdigest()[:12]
    base = Path(root or default_cache_dir()) / "rl-task" / key
    base.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in files.items():
        _write(base / f"{name}.jsonl", "\n".join(lines) + "\n")
        paths[name] = str(base / f"{name}.jsonl")
    paths["warmup"] = str(base / "warmup")
    return paths


def run(argv: list[str], rl_main: Callable[[list[str]], int]) -> int:
    """The built-in task: the warm-up (unless its checkpoint exists), then the RL job (`rl_main`, `megalite rl`'s
    entry) with `argv` after its flags."""
    from megalite import pretrain

    paths = prepare()
    if latest_iteration(paths["warmup"]) is None:
        print(f"megalite rl: the built-in task (docs/rl.md): SFT warm-up into {paths['warmup']}", flush=True)
        pretrain.main([*WARMUP_FLAGS, "--data-path", paths["sft"], "--save", paths["warmup"]])
    else:
        print(f"megalite rl: the built-in task (docs/rl.md): reusing the SFT warm-up {paths['warmup']} (delete it "
              "to redo it)", flush=True)
    return rl_main([*RL_FLAGS, "--load", paths["warmup"], "--data-path", paths["prompts"], "--ppo-eval-data-path",
                     paths["held_out"], *argv])
