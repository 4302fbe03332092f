"""`megalite bench NAME`: benchmarks that time megalite against a baseline in the same run and print ratios."""
from __future__ import annotations

from megalite.subcommands import dispatch

BENCHMARKS = {
    "generate": ("megalite.bench.generate", "KV-cache generation: megalite vs a plain PyTorch decode loop and HF generate"),
    "gpu-check": ("megalite.bench.gpu_check", "one GPU in minutes: CUDA tests, bf16 TFLOP/s and MFU, generation (launch/gpu_check.sh)"),
    "index": ("megalite.bench.index", "C++ sample-index builder vs NumPy on 10 million documents"),
    "moe": ("megalite.bench.moe", "MoE layer and MoE GPT training step: grouped experts vs the per-expert loop"),
    "memory": ("megalite.bench.memory", "activation bytes saved per layer (TP, SP, recompute) vs Korthikanti et al."),
    "step": ("megalite.bench.step", "one training step: megalite GPT at TP=1 vs a plain PyTorch GPT"),
}


def main(argv: list[str]) -> int:
    return dispatch("megalite bench", BENCHMARKS, argv)
