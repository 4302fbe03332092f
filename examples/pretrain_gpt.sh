#!/usr/bin/env bash
# A full set of Megatron-style flags for a real dense run: a 1.3B-parameter GPT (24 layers, hidden 2048) on one
# node of 8 GPUs with TP=2, PP=2 (interleaved 1F1B), DP=2, bf16, on a Megatron indexed dataset.
#   DATA_PATH="0.7 /data/web_text_document 0.3 /data/code_text_document" TOKENIZER_MODEL=/data/tokenizer.json \
#   CHECKPOINT_DIR=/ckpt/gpt-1.3b bash examples/pretrain_gpt.sh
# Any flag can be appended to override these; `megalite train --help` lists them all.
set -euo pipefail
: "${DATA_PATH:?set DATA_PATH to one or more (weighted) indexed-dataset prefixes}"
: "${CHECKPOINT_DIR:?set CHECKPOINT_DIR}"

ARGS=(
    # layout
    --tensor-model-parallel-size 2 --sequence-parallel
    --pipeline-model-parallel-size 2 --pipeline-schedule interleaved --num-layers-per-virtual-pipeline-stage 6
    # model
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 8 --ffn-hidden-size 5504
    --seq-length 4096 --normalization RMSNorm --swiglu --rotary-base 500000 --disable-bias-linear
    --untie-embeddings-and-output-weights --hidden-dropout 0.0 --attention-dropout 0.0
    # batch, length, optimizer, precision
    --micro-batch-size 2 --global-batch-size 512 --train-samples 146484224
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --clip-grad 1.0
    --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --recompute-granularity selective --overlap-grad-reduce
    # data
    --data-path ${DATA_PATH} --split 969,30,1 --eod-mask-loss
    ${TOKENIZER_MODEL:+--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"}
    # logging, evaluation, checkpoints
    --log-interval 10 --eval-interval 1000 --eval-iters 20 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard"
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000
)
exec torchrun --standalone --nproc-per-node 8 -m megalite train "${ARGS[@]}" "$@"
