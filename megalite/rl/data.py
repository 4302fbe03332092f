"""Prompt files and the samples an RL step trains on.

Prompt files (--data-path): JSON lines with a prompt field (--prompt-key) and a label field (--label-key; any JSON
value, compared as text); each file is cut down to a multiple of the rollout global batch, and the files are read in
order. The stream visits them in a seeded order, reshuffled every epoch; its position is the number of prompts
consumed, and a prompt's id (which keys its samples' random generators) is its position in the stream.

A training sample of a response: tokens = (prompt + response)[:-1], labels = (prompt + response)[1:], padded to
--seq-length with the end-of-document token; the loss mask covers the labels that are response tokens; the
advantage of the sample at every token; with routing replay the experts of every input token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megalite.errors import DataError


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str
    where: str


def read_prompts(path: str, prompt_key: str, label_key: str, flag: str = "--data-path") -> list[Prompt]:
    """Every prompt of a JSON-lines file (given with `flag`); a bad line is an error naming file:line."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{flag} {path}: no such prompt file")
    out = []
    for number, raw in enumerate(file.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: not a JSON line ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(prompt_key), str):
            raise DataError(f"{where}: no string field {prompt_key!r} (set --prompt-key)")
        if label_key not in record:
            raise DataError(f"{where}: no field {label_key!r} (set --label-key)")
        label = record[label_key]
        out.append(Prompt(record[prompt_key], label if isinstance(label, str) else json.dumps(label), where))
    return out


class PromptStream:
    """The prompts of all files (each cut to `used` prompts) in a seeded order per epoch."""

    def __init__(self, files: list[list[Prompt]], used: list[int], seed: int):
        self.prompts = [p for prompts, n in zip(files, used) for p in prompts[:n]]
        self.seed = seed

    def take(self, position: int, count: int) -> list[tuple[int, Prompt]]:
        """`count` prompts from stream position `position`: (position of each, the prompt)."""
        n, out = len(self.prompts), []
        for k in range(position, position + count):
            epoch, i = divmod(k, n)
            order = np.random.RandomState((self.seed + epoch) % 2**32).permutation(n)
            out.append((k, self.prompts[order[i]]))
        return out


def training_sample(prompt: list[int], response: list[int], advantage: float, seq_length: int, pad: int,
                    routed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The sample of one response (see the module docstring)."""
    tokens = torch.tensor(prompt + response, dtype=torch.int64)
    if tokens.numel() > seq_length + 1:
        raise ValueError(f"a prompt and its response hold {tokens.numel()} tokens, more than --seq-length + 1")
    padded = torch.full((seq_length + 1,), pad, dtype=torch.int64)
    padded[: tokens.numel()] = tokens
    mask = torch.zeros(seq_length, dtype=torch.float32)
    mask[len(prompt) - 1: tokens.numel() - 1] = 1.0  # labels that are response tokens
    sample = {"tokens": padded[:-1], "labels": padded[1:], "loss_mask": mask,
              "advantages": torch.full((seq_length,), float(advantage))}
    if routed is not None:  # [inputs, MoE layers, k] for prompt + response[:-1]; padding routed to experts 0..k-1
        experts = torch.arange(routed.shape[-1]).expand(seq_length, *routed.shape[1:]).clone()
        experts[: routed.shape[0]] = routed
        sample["routed_experts"] = experts
    return sample
