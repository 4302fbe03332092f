"""Tensor and sequence parallelism: autograd collectives, parallel layers, vocab-parallel loss, RNG."""
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    defer_weight_grads,
)
from megalite.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from megalite.tensor_parallel.sharding import ShardSpec, gather_full, get_spec, initialize_parameters

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "ShardSpec", "VocabParallelEmbedding", "defer_weight_grads",
    "gather_full", "get_rng_tracker", "get_spec", "initialize_parameters", "model_parallel_seed",
    "vocab_parallel_cross_entropy",
]
