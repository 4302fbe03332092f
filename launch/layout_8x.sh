# Shared by the launch scripts (train_8xH20.sh, train_cpu.sh, rl_8xH20.sh, rl_cpu.sh): the reference layout on 8
# ranks, the MoE router settings and the two model shapes, so the GPU jobs and their CPU rehearsals run the same
# parallel code paths. Source it; do not run it.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 2
    --context-parallel-size 4
    --pipeline-model-parallel-size 1
    --expert-model-parallel-size 4
    --expert-tensor-parallel-size 2
    --sequence-parallel
    --cp-comm-type p2p
    --use-distributed-optimizer   # main weights and Adam moments sharded over DP x CP (4 ranks for dense weights)
)
MOE_ARGS=(
    --moe-token-dispatcher-type alltoall
    --moe-router-score-function softmax
    --moe-aux-loss-coeff 0.001
    --moe-z-loss-coeff 0.001
)
NPROC=8

# The GPU jobs' model: Qwen1.5-MoE-A2.7B's shape at 32k tokens (24 layers, hidden 2048, 16 heads, 60 experts of 1408
# + a shared expert of 5632, top-4; 14.3B parameters).
QWEN_MOE_ARGS=(
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 5632
    --seq-length 32768 --normalization RMSNorm --swiglu --rotary-base 1000000 --disable-bias-linear
    --untie-embeddings-and-output-weights
    --num-experts 60 --moe-router-topk 4 --moe-ffn-hidden-size 1408 --moe-shared-expert-intermediate-size 5632
)
# The CPU rehearsals' model: a tiny MoE GPT of the same kind.
TINY_MOE_ARGS=(
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 --seq-length 128
    --swiglu --disable-bias-linear --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 64
    --moe-shared-expert-intermediate-size 64
)
