"""Context parallelism: zigzag sharding of the sequence and ring attention over the CP group."""
from megalite.context_parallel.ring import COMM_TYPES, ring_attention, ring_attention_comm_bytes
from megalite.context_parallel.zigzag import zigzag_positions, zigzag_shard, zigzag_unshard

__all__ = [
    "COMM_TYPES",
    "ring_attention",
    "ring_attention_comm_bytes",
    "zigzag_positions",
    "zigzag_shard",
    "zigzag_unshard",
]
