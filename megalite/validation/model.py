"""Rules on the model: shapes, heads and query groups, MLP sizes, dropout, and mixture-of-experts."""
from __future__ import annotations

from megalite.config import MegaliteConfig, moe_layer_pattern
from megalite.validation.core import Defaults, flag_name


def heads_divisible_by_tp(c: MegaliteConfig, d: Defaults) -> str | None:
    tp, heads = c.parallel.tensor_model_parallel_size, c.model.num_attention_heads
    if tp >= 1 and heads % tp:
        return (
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}; "
            "each TP rank needs whole heads."
        )
    return None


def query_groups_divisible_by_tp(c: MegaliteConfig, d: Defaults) -> str | None:
    tp, groups = c.parallel.tensor_model_parallel_size, c.model.num_query_groups
    if groups and tp >= 1 and groups % tp:
        return (
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}; "
            "each TP rank needs whole key/value groups."
        )
    return None


def heads_divisible_by_query_groups(c: MegaliteConfig, d: Defaults) -> str | None:
    heads, groups = c.model.num_attention_heads, c.model.num_query_groups
    if groups is not None and (groups < 1 or heads % groups):
        return f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; pick a divisor."
    return None


def hidden_divisible_by_heads(c: MegaliteConfig, d: Defaults) -> str | None:
    h, heads = c.model.hidden_size, c.model.num_attention_heads
    if c.model.kv_channels is None and (heads < 1 or h % heads):
        return (f"--hidden-size {h} is not divisible by --num-attention-heads {heads}; set --kv-channels for a head "
                "size of its own.")
    return None


def head_dim_even_for_rotary(c: MegaliteConfig, d: Defaults) -> str | None:
    m = c.model
    if m.kv_channels is not None:
        if m.kv_channels < 2 or m.kv_channels % 2:
            return f"--kv-channels {m.kv_channels} must be even and positive: rotary embeddings rotate pairs."
        return None
    h, heads = m.hidden_size, m.num_attention_heads
    if heads >= 1 and h % heads == 0 and (h // heads) % 2:
        return (
            f"head size --hidden-size {h} / --num-attention-heads {heads} = {h // heads} is odd; "
            "rotary embeddings need an even head size."
        )
    return None


def vocabulary_divisible_by_tp(c: MegaliteConfig, d: Defaults) -> str | None:
    m, tp = c.model, c.parallel.tensor_model_parallel_size
    if m.make_vocab_size_divisible_by < 1:
        return f"--make-vocab-size-divisible-by {m.make_vocab_size_divisible_by} must be at least 1."
    if m.vocab_size is not None and m.vocab_size >= 1 and tp >= 1 and m.padded_vocab_size % tp:
        return (f"the vocabulary padded to {m.padded_vocab_size} (--vocab-size {m.vocab_size}, "
                f"--make-vocab-size-divisible-by {m.make_vocab_size_divisible_by}) is not divisible by "
                f"--tensor-model-parallel-size {tp}; raise --make-vocab-size-divisible-by to a multiple of {tp}.")
    return None


def ffn_divisible_by_tp(c: MegaliteConfig, d: Defaults) -> str | None:
    tp, ffn = c.parallel.tensor_model_parallel_size, d.ffn_hidden_size
    if tp >= 1 and ffn % tp:
        return f"--ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size {tp}."
    return None


def experts_needed_for_ep(c: MegaliteConfig, d: Defaults) -> str | None:
    ep = c.parallel.expert_model_parallel_size
    if ep > 1 and not c.model.num_experts:
        return f"--expert-model-parallel-size {ep} needs an MoE model: set --num-experts."
    return None


def experts_divisible_by_ep(c: MegaliteConfig, d: Defaults) -> str | None:
    ep, experts = c.parallel.expert_model_parallel_size, c.model.num_experts
    if experts and ep >= 1 and experts % ep:
        return (
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}; "
            "each EP rank holds the same number of experts."
        )
    return None


def topk_at_most_experts(c: MegaliteConfig, d: Defaults) -> str | None:
    k, experts = c.model.moe_router_topk, c.model.num_experts
    if experts and not 1 <= k <= experts:
        return f"--moe-router-topk {k} must be between 1 and --num-experts {experts}."
    return None


def expert_ffn_divisible_by_etp(c: MegaliteConfig, d: Defaults) -> str | None:
    ffn, etp = d.moe_ffn_hidden_size, d.expert_tensor_parallel_size
    if ffn is not None and etp >= 1 and ffn % etp:
        return f"--moe-ffn-hidden-size {ffn} is not divisible by --expert-tensor-parallel-size {etp}."
    return None


def shared_expert_divisible_by_tp(c: MegaliteConfig, d: Defaults) -> str | None:
    size, tp = c.model.moe_shared_expert_intermediate_size, c.parallel.tensor_model_parallel_size
    if size and tp >= 1 and size % tp:
        return f"--moe-shared-expert-intermediate-size {size} is not divisible by --tensor-model-parallel-size {tp}."
    return None


def shared_expert_gate_needs_shared_expert(c: MegaliteConfig, d: Defaults) -> str | None:
    m = c.model
    if m.moe_shared_expert_gate and not (m.num_experts and m.moe_shared_expert_intermediate_size):
        return "--moe-shared-expert-gate needs an MoE model with a shared expert: set --num-experts and " \
               "--moe-shared-expert-intermediate-size."
    return None


def moe_layer_freq_well_formed(c: MegaliteConfig, d: Defaults) -> str | None:
    if c.model.num_layers < 1:
        return None
    try:
        moe_layer_pattern(c.model.moe_layer_freq, c.model.num_layers)
    except ValueError as e:
        return f"{e}."
    return None


def positive_shapes(c: MegaliteConfig, d: Defaults) -> str | None:
    m = c.model
    bad = [
        f"{flag_name(n)} {v}"
        for n, v in [("hidden_size", m.hidden_size), ("num_attention_heads", m.num_attention_heads),
                     ("seq_length", m.seq_length)]
        if v < 1
    ]
    return f"{', '.join(bad)}: must be at least 1." if bad else None


def attention_dropout_without_ring(c: MegaliteConfig, d: Defaults) -> str | None:
    if c.model.attention_dropout > 0 and c.parallel.context_parallel_size > 1:
        return (f"--attention-dropout {c.model.attention_dropout} with --context-parallel-size "
                f"{c.parallel.context_parallel_size}: ring attention has no attention dropout; set "
                "--attention-dropout 0 (or use --hidden-dropout).")
    return None


def dropout_is_a_probability(c: MegaliteConfig, d: Defaults) -> str | None:
    m = c.model
    for name in ("hidden_dropout", "attention_dropout"):
        v = getattr(m, name)
        if not 0.0 <= v < 1.0:
            return f"{flag_name(name)} {v} must be in [0, 1)."
    return None
