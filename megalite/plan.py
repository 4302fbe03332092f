"""`megalite plan NAME`: plan a layout without running it."""
from __future__ import annotations

from megalite.subcommands import dispatch

PLANS = {
    "pipeline": ("megalite.pipeline.simulator", "simulate pipeline schedules: bubble and peak activations"),
    "memory": ("megalite.plan_memory", "per-rank memory estimate of a training run, on the meta device"),
    "rl": ("megalite.rl.plan_cli", "an RL job's derived step counts and per-rank memory (--ppo-* flags)"),
}


def main(argv: list[str]) -> int:
    return dispatch("megalite plan", PLANS, argv)
