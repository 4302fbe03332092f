# Shared by launch/train_8xH20.sh and launch/train_cpu.sh: the reference layout on 8 ranks and the MoE router
# settings, so the GPU job and its CPU rehearsal run the same parallel code paths. Source it; do not run it.
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
