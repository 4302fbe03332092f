"""Tensor and sequence parallelism: autograd collectives, parallel layers, vocab-parallel loss, RNG streams."""
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megalite.tensor_parallel.log_probs import entropy as vocab_parallel_entropy
from megalite.tensor_parallel.log_probs import log_probs as vocab_parallel_log_probs
from megalite.tensor_parallel.random import RNGTracker
from megalite.tensor_parallel.sharding import ShardSpec, gather_full, get_spec, initialize_parameters

__all__ = [
    "ColumnParallelLinear", "RNGTracker", "RowParallelLinear", "ShardSpec", "VocabParallelEmbedding",
    "gather_full", "get_spec", "initialize_parameters", "vocab_parallel_cross_entropy", "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
]
