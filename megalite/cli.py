"""The `megalite` command: one subcommand per job, each implemented by a module's `main(argv) -> int`."""
from __future__ import annotations

import importlib
import os
import sys

import torch.distributed as dist

from megalite.errors import ConfigError, MegaliteError

# subcommand -> (module whose main(argv) runs it, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megalite.pretrain", "pretrain a GPT model, or fine-tune it on conversations with --sft (no flags: a small GPT on the embedded corpus)"),
    "rl": ("megalite.rl.job", "RL post-training (GRPO, GSPO) with the --ppo-* flags (docs/rl.md)"),
    "generate": ("megalite.inference.cli", "continue prompts with a checkpoint or Hugging Face model (KV cache, any layout)"),
    "convert": ("megalite.checkpoint.convert", "Hugging Face model <-> megalite checkpoint (--from-hf / --to-hf)"),
    "preprocess": ("megalite.data.preprocess", "text or JSON lines -> Megatron indexed dataset (no input: embedded corpus)"),
    "bench": ("megalite.bench", "benchmarks that compare megalite with a baseline in the same run"),
    "plan": ("megalite.plan", "plan without running (e.g. simulate pipeline schedules)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: megalite COMMAND [FLAGS]   (megalite COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"megalite: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except MegaliteError as e:
        report(f"megalite {command}", e)
        return 2 if isinstance(e, ConfigError) else 1


def report(prog: str, error: MegaliteError) -> None:
    """One short message for a known failure, no traceback. Before the process group exists every rank has the same
    error and rank 0 (by the launcher's RANK) speaks for all; afterwards any rank that fails says so, naming itself."""
    rank = int(os.environ.get("RANK", "0"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        print(f"{prog}: error on rank {dist.get_rank()}: {error}", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
