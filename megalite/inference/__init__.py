"""Generation with a KV cache on the training layout (`megalite generate`, and the rollouts of RL)."""
from megalite.inference.engine import Completion, Generator, Request, generate, generation_mode, replica_share
from megalite.inference.kv_cache import CacheStep, KVCache
from megalite.inference.sampling import SamplingParams, draw, sample_generator, shape_logits

__all__ = ["CacheStep", "Completion", "Generator", "KVCache", "Request", "SamplingParams", "draw", "generate",
           "generation_mode", "replica_share", "sample_generator", "shape_logits"]
