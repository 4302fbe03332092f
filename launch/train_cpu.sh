#!/usr/bin/env bash
# The 8 x H20 layout (TP=2 CP=4 PP=1 EP=4 ETP=2, same flags from layout_8x.sh) rehearsed on one CPU machine:
# 8 gloo processes, a tiny MoE GPT, the embedded corpus. Extra flags are passed through (e.g. --train-iters 10).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=layout_8x.sh
source "$here/layout_8x.sh"

TRAIN_ARGS=(--micro-batch-size 4 --global-batch-size 8 --train-iters 40 --lr 3e-3 --lr-warmup-iters 4
            --log-interval 5)

OMP_NUM_THREADS=1 exec torchrun --standalone --nproc-per-node "$NPROC" -m megalite train \
    --distributed-backend gloo "${LAYOUT_ARGS[@]}" "${MOE_ARGS[@]}" "${TINY_MOE_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
