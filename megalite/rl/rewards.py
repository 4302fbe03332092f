"""Rewards of responses, and which samples of each group are kept.

Built-in rule reward (`rule_reward`): 1 when the response's final answer equals the label's, else 0, plus an
optional format bonus when the response states its answer in `\\boxed{...}`. The final answer is the content of the
last `\\boxed{...}` (braces balanced), else the last number in the text, else the whole text; answers are compared
after normalising (spaces removed, a trailing period, `$` signs and a `.0` on integers dropped).

A user reward (`--reward-fn FILE.py:NAME`) is a function `NAME(prompt: str, response: str, label: str) -> float`
(`label` is the prompt line's --label-key field, as a string). An exception it raises, or a result that is not a
finite number, stops the job with an error naming the function and the prompt.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Callable

import torch

from megalite.errors import ConfigError, TrainingError

RewardFn = Callable[[str, str, str], float]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` of `text` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalize_answer(answer: str) -> str:
    out = answer.replace(" ", "").replace("$", "").rstrip(".")
    return out[:-2] if re.fullmatch(r"-?\d+\.0", out) else out


def final_answer(text: str) -> str:
    """The response's final answer (see the module docstring), normalised."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return normalize_answer(boxed)
    numbers = _NUMBER.findall(text)
    return normalize_answer(numbers[-1] if numbers else text.strip())


def rule_reward(prompt: str, response: str, label: str, format_bonus: float = 0.0) -> float:
    """1 for the label's answer (plus `format_bonus` for a `\\boxed{}` answer), else 0 (plus the bonus)."""
    del prompt
    bonus = format_bonus if extract_boxed(response) is not None else 0.0
    return float(final_answer(response) == final_answer(label)) + bonus


def load_reward_fn(spec: str) -> RewardFn:
    """`FILE.py:NAME` -> the function; ConfigError naming what is wrong."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ConfigError(f"--reward-fn {spec}: give FILE.py:NAME")
    if not Path(path).is_file():
        raise ConfigError(f"--reward-fn {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"megalite_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's module: any error, reported with its type
        raise ConfigError(f"--reward-fn {spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec}: {path} has no function {name!r}")
    return fn


def compute_rewards(fn: RewardFn, prompts: list[str], responses: list[str], labels: list[str],
                    name: str = "the reward function") -> torch.Tensor:
    """fn(prompt, response, label) for every sample: [n] float32; TrainingError naming the prompt on any failure."""
    out = []
    for i, (p, r, y) in enumerate(zip(prompts, responses, labels, strict=True)):
        try:
            value = float(fn(p, r, y))
        except Exception as e:  # the user's function: any error, reported with the sample
            raise TrainingError(f"{name} raised {type(e).__name__}: {e} (sample {i}, prompt {p[:60]!r})") from e
        if not math.isfinite(value):
            raise TrainingError(f"{name} returned {value} for sample {i} (prompt {p[:60]!r}); rewards must be finite")
        out.append(value)
    return torch.tensor(out, dtype=torch.float32)


def keep_samples(rewards: torch.Tensor, strategy: str, keep: int) -> torch.Tensor:
    """Indices [groups, keep] of the samples kept from each group of rewards [groups, repeat]: 'all' every one,
    'test' the first `keep`, 'best-and-worst' the highest- and the lowest-reward one (the first of equals; a group of
    equal rewards keeps its first two)."""
    groups, repeat = rewards.shape
    if strategy == "all":
        return torch.arange(repeat).expand(groups, repeat)
    if strategy == "test":
        return torch.arange(keep).expand(groups, keep)
    if strategy == "best-and-worst":
        best, worst = rewards.argmax(1), rewards.argmin(1)
        worst = torch.where(best == worst, (best + 1) % repeat, worst)
        return torch.stack([best, worst], dim=1)
    raise ValueError(f"unknown keeping strategy {strategy!r}")


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[groups] bool: groups whose rewards are not all equal (dynamic sampling drops the others)."""
    return (rewards != rewards[:, :1]).any(1)
