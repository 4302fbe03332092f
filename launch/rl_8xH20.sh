#!/usr/bin/env bash
# GRPO on 8 x H20 (96 GB): the layout of train_8xH20.sh (TP=2 CP=4 PP=1 EP=4 ETP=2, from layout_8x.sh), its
# Qwen1.5-MoE-A2.7B shape at 32k tokens, and the reference RL flags (docs/rl.md): 32 prompts x 8 samples per PPO
# step, 8 optimizer steps of 32 samples each, a save every 5 PPO steps, routing replay, a KL penalty to the reference.
# Derived steps and memory without GPUs: megalite plan rl <the same flags> --world-size 8 (84.2 GiB per GPU with
# the Qwen vocabulary of 151,936).
#
# Environment: DATA_PATH (prompt files: JSON lines with "prompt" and "label"), LOAD_CHECKPOINT_DIR (the SFT model),
# REF_LOAD_CHECKPOINT_DIR (the reference; default: LOAD_CHECKPOINT_DIR), SAVE_CHECKPOINT_DIR, TOKENIZER_MODEL (a
# tokenizer.json; unset: byte-level), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (29500),
# GPUS_PER_NODE (8).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=layout_8x.sh
source "$here/layout_8x.sh"
: "${DATA_PATH:?set DATA_PATH to the prompt files}"
: "${LOAD_CHECKPOINT_DIR:?set LOAD_CHECKPOINT_DIR to the SFT checkpoint}"
: "${SAVE_CHECKPOINT_DIR:?set SAVE_CHECKPOINT_DIR}"

RL_ARGS=(
    --ppo-auto-calc-args --ppo-max-epochs 1 --ppo-step-per-epoch -1 --ppo-rollout-global-batch-size 32
    --ppo-rollout-micro-batch-size 1 --ppo-sampling-repeat 8 --ppo-sampling-keep 8 --ppo-sampling-keeping-strategy all
    --global-batch-size 32 --ppo-max-epochs-2 1 --ppo-step-save-interval 5 --ppo-resp-seq-len 28672
    --ppo-logps-fwd-micro-batch-size 4 --train-iters -1 --save-interval -1
    --use-grpo --grpo-kl-loss-beta 0.001 --moe-router-replay --ppo-rollout-temperature 1.0
)
TRAIN_ARGS=(--bf16 --micro-batch-size 1 --lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --clip-grad 1.0
            --log-interval 1 --recompute-granularity selective)
DATA_ARGS=(--data-path ${DATA_PATH})
[[ -n "${TOKENIZER_MODEL:-}" ]] && DATA_ARGS+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
CKPT_ARGS=(--load "$LOAD_CHECKPOINT_DIR" --load-ref "${REF_LOAD_CHECKPOINT_DIR:-$LOAD_CHECKPOINT_DIR}"
           --save "$SAVE_CHECKPOINT_DIR")

exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-$NPROC}" \
    --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-29500}" \
    -m megalite rl "${LAYOUT_ARGS[@]}" "${MOE_ARGS[@]}" "${QWEN_MOE_ARGS[@]}" "${RL_ARGS[@]}" "${TRAIN_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "$@"
