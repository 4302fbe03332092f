#!/usr/bin/env bash
# A ready GPU check (issue 17): on one GPU, offline, nothing to install, within 8 minutes: the CUDA tests, training
# TFLOP/s and MFU of a dense ~1B and a MoE shape in bf16 (flash-attn / Transformer Engine when importable) and
# greedy generation tokens/s, printed as one table (megalite/bench/gpu_check.py). Run from the repository root.
# Extra flags go to `megalite bench gpu-check` (--iters N; --smoke: tiny shapes, how the tests run it on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python -m megalite bench gpu-check "$@"
