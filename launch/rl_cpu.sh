#!/usr/bin/env bash
# The RL job of rl_8xH20.sh rehearsed on one CPU machine: the same layout (TP=2 CP=4 EP=4 ETP=2, layout_8x.sh) and
# RL flags with small lengths, 8 gloo processes, a tiny MoE GPT from its seed with routing replay, the shipped
# arithmetic prompts (examples/rl/arithmetic_prompts.jsonl) and the rule reward. Extra flags are passed through
# (e.g. --ppo-step-per-epoch 2 without --ppo-auto-calc-args for a short run).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=layout_8x.sh
source "$here/layout_8x.sh"

RL_ARGS=(
    --ppo-auto-calc-args --ppo-max-epochs 1 --ppo-step-per-epoch -1 --ppo-rollout-global-batch-size 8
    --ppo-rollout-micro-batch-size 1 --ppo-sampling-repeat 4 --ppo-sampling-keep 4 --ppo-sampling-keeping-strategy all
    --global-batch-size 16 --ppo-max-epochs-2 1 --ppo-resp-seq-len 32 --ppo-logps-fwd-micro-batch-size 4
    --train-iters -1 --use-grpo --grpo-kl-loss-beta 0.001 --moe-router-replay
)
TRAIN_ARGS=(--micro-batch-size 4 --lr 1e-4 --lr-decay-style constant --log-interval 1)

OMP_NUM_THREADS=1 exec torchrun --standalone --nproc-per-node "$NPROC" -m megalite rl \
    --distributed-backend gloo "${LAYOUT_ARGS[@]}" "${MOE_ARGS[@]}" "${TINY_MOE_ARGS[@]}" "${RL_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" --data-path "$here/../examples/rl/arithmetic_prompts.jsonl" "$@"
