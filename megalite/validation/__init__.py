"""Validation rules: every invalid combination of flags is rejected before any process group or file exists,
with a message that names the flags and the fix.

A rule is a function `rule(config, defaults) -> str | None` (`core.Rule`), given the `Defaults` computed once for
the config. The rules live by concern in `layout`, `model` and `training`; `RULES` lists them in the order their
messages appear."""
from __future__ import annotations

from megalite.config import MegaliteConfig
from megalite.validation import compat, layout, model, training
from megalite.errors import ConfigError
from megalite.validation.core import Defaults, Rule, defaults, flag_name
from megalite.validation.training import split_weights

__all__ = ["RULES", "ConfigError", "Defaults", "Rule", "defaults", "flag_name", "split_weights", "validate"]

RULES: tuple[Rule, ...] = (
    layout.positive_parallel_sizes,
    layout.world_divides_dense_grid,
    layout.world_divides_expert_grid,
    layout.rank_order_is_a_permutation,
    model.heads_divisible_by_tp,
    model.query_groups_divisible_by_tp,
    model.heads_divisible_by_query_groups,
    model.hidden_divisible_by_heads,
    model.head_dim_even_for_rotary,
    model.vocabulary_divisible_by_tp,
    model.ffn_divisible_by_tp,
    model.experts_needed_for_ep,
    model.experts_divisible_by_ep,
    model.topk_at_most_experts,
    model.expert_ffn_divisible_by_etp,
    model.shared_expert_divisible_by_tp,
    model.shared_expert_gate_needs_shared_expert,
    model.moe_layer_freq_well_formed,
    layout.layers_divisible_by_pp,
    layout.interleaving_flags_agree,
    layout.interleaving_needs_pipeline,
    layout.virtual_stages_divide_layers,
    layout.zero_bubble_v_needs_two_chunks,
    layout.sequence_divisible_for_cp,
    layout.sequence_divisible_for_sp,
    model.positive_shapes,
    model.dropout_is_a_probability,
    model.attention_dropout_without_ring,
    training.micro_batch_positive,
    training.global_batch_divisible,
    training.interleaving_microbatches,
    training.one_precision,
    training.one_training_length,
    training.train_samples_hold_a_batch,
    training.learning_rates_ordered,
    training.intervals_positive,
    training.clip_grad_not_negative,
    training.warmup_within_decay,
    training.save_interval_needs_save,
    training.data_path_well_formed,
    training.split_well_formed,
    training.tokenizer_model_given,
    training.sft_data_given,
    training.document_masks_supported,
    compat.fp8_refused,
    compat.decoupled_lr_refused,
    compat.rampup_batch_size_refused,
    compat.rotary_positions_only,
    compat.sequence_within_max_positions,
    compat.schedule_in_iterations_or_samples,
    compat.tokenizer_usable,
)
"""Every rule, in the order their messages are listed."""


def validate(c: MegaliteConfig, world_size: int) -> Defaults:
    """Raise `ConfigError` listing every rule `c` breaks on `world_size` ranks; otherwise return the `Defaults`
    the rules were checked with."""
    d = defaults(c, world_size)
    errors = [msg for r in RULES if (msg := r(c, d))]
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return d
