#!/usr/bin/env bash
# 8 x H20 (96 GB): TP=2 CP=4 PP=1 EP=4 ETP=2, sequence length 32768, bf16, a Qwen1.5-MoE-A2.7B-shaped model
# (24 layers, hidden 2048, 16 heads, 60 experts of 1408 + a shared expert of 5632, top-4; 14.3B parameters).
# The per-GPU memory estimate is printed at start-up; without GPUs: megalite plan memory <the same flags> --world-size 8
# (55.6 GiB per GPU with the Qwen vocabulary of 151,936, --vocab-size 151936).
#
# Environment: DATA_PATH (Megatron indexed-dataset prefix(es), optionally weighted; unset: the embedded corpus),
# TOKENIZER_MODEL (a tokenizer.json; unset: byte-level), LOAD_CHECKPOINT_DIR, SAVE_CHECKPOINT_DIR,
# NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (29500), GPUS_PER_NODE (8).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=layout_8x.sh
source "$here/layout_8x.sh"

TRAIN_ARGS=(
    --bf16 --micro-batch-size 1 --global-batch-size 64 --train-iters 20000
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.1 --clip-grad 1.0
    --log-interval 1 --eval-interval 1000 --eval-iters 10
    --recompute-granularity selective --overlap-grad-reduce
)
DATA_ARGS=()
[[ -n "${DATA_PATH:-}" ]] && DATA_ARGS+=(--data-path ${DATA_PATH})
[[ -n "${TOKENIZER_MODEL:-}" ]] && DATA_ARGS+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
CKPT_ARGS=()
[[ -n "${LOAD_CHECKPOINT_DIR:-}" ]] && CKPT_ARGS+=(--load "$LOAD_CHECKPOINT_DIR")
[[ -n "${SAVE_CHECKPOINT_DIR:-}" ]] && CKPT_ARGS+=(--save "$SAVE_CHECKPOINT_DIR" --save-interval 500)

exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-$NPROC}" \
    --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-29500}" \
    -m megalite train "${LAYOUT_ARGS[@]}" "${MOE_ARGS[@]}" "${QWEN_MOE_ARGS[@]}" "${TRAIN_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "$@"
