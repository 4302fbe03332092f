"""Megatron-LM flags that megalite accepts so that Megatron's training scripts port unchanged, but that change nothing
here (they tune kernels or machinery megalite does not have) or that megalite cannot honour.

The first kind is listed once at start-up when given (`no_effect`); the second is refused by a validation rule with
the reason. Megatron flags whose feature megalite has live with their feature in `megalite.config`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MegatronCompatConfig:
    """Megatron-LM flags accepted for compatibility: most change nothing in megalite (listed at start-up), fp8,
    --decoupled-lr and --rampup-batch-size are refused with the reason."""

    use_mcore_models: bool = False
    """Megatron: use Megatron-Core models. No effect: megalite has one model implementation."""
    group_query_attention: bool = False
    """Megatron: enable grouped-query attention. No effect: --num-query-groups alone sets it in megalite."""
    no_position_embedding: bool = False
    """Megatron: no learned absolute position embedding. No effect: megalite has only rotary positions."""
    no_masked_softmax_fusion: bool = False
    """Megatron: a CUDA softmax kernel. No effect."""
    cross_entropy_loss_fusion: bool = False
    """Megatron: a fused CUDA cross-entropy kernel. No effect (megalite's vocab-parallel cross entropy is used)."""
    calculate_per_token_loss: bool = False
    """Megatron: normalise the loss by the tokens of the global batch. No effect: megalite always does."""
    grad_reduce_in_bf16: bool = False
    """Megatron: reduce gradients in bf16. No effect: megalite reduces fp32 gradient buffers."""
    overlap_param_gather: bool = False
    """Megatron: overlap the distributed optimizer's all-gather with the forward. No effect: not overlapped here."""
    moe_grouped_gemm: bool = False
    """Megatron: grouped GEMM for the experts (Transformer Engine / CUTLASS). No effect."""
    manual_gc: bool = False
    """Megatron: manual Python garbage collection. No effect."""
    empty_unused_memory_level: int = 0
    """Megatron: empty the CUDA cache during the step. No effect."""
    log_throughput: bool = False
    """Megatron: log tokens per second. No effect: megalite always logs tokens/s."""
    no_create_attention_mask_in_dataloader: bool = False
    """Megatron: no attention masks from the data loader. No effect: megalite never builds them."""
    no_mmap_bin_files: bool = False
    """Megatron: read .bin files without mmap. No effect."""
    num_workers: int = 2
    """Megatron: data-loader worker processes. No effect: megalite reads samples in the training process."""
    tiktoken_pattern: str | None = None
    """Megatron: the regex of a tiktoken tokenizer. No effect: megalite has no tiktoken tokenizer."""
    fp8_format: str | None = None
    """Megatron: fp8 training (needs Transformer Engine's fp8 recipes). Refused: megalite does not implement fp8."""
    fp8_amax_history_len: int | None = None
    """Megatron: fp8 scaling history. Refused with --fp8-format."""
    fp8_amax_compute_algo: str | None = None
    """Megatron: fp8 scaling algorithm. Refused with --fp8-format."""
    fp8_param_gather: bool = False
    """Megatron: all-gather fp8 parameters. Refused with --fp8-format."""
    decoupled_lr: float | None = None
    """Megatron: a learning rate of its own for the embedding and output layer. Refused: not implemented."""
    decoupled_min_lr: float | None = None
    """Megatron: the minimum of --decoupled-lr. Refused: not implemented."""
    rampup_batch_size: list[int] | None = None
    """Megatron: ramp the global batch up (start, increment, samples). Refused: not implemented."""


NO_EFFECT = tuple(name for name in MegatronCompatConfig.__dataclass_fields__
                  if not name.startswith(("fp8_", "decoupled_", "rampup_")))
REFUSED = tuple(name for name in MegatronCompatConfig.__dataclass_fields__ if name not in NO_EFFECT)


def no_effect(compat: MegatronCompatConfig) -> list[str]:
    """The flags given that change nothing in megalite, as written on the command line."""
    default = MegatronCompatConfig()
    return ["--" + name.replace("_", "-") for name in NO_EFFECT if getattr(compat, name) != getattr(default, name)]
