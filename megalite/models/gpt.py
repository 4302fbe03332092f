"""The one GPT model: token embedding, pre-norm transformer layers with rotary grouped-query attention and a
GeLU, SwiGLU or MoE feed-forward block, final norm, output layer tied or untied to the embedding.

Parallelism shows up only as the layer classes and the groups they are given: column/row-parallel linears (TP),
sequence-parallel activations [s/t, b, h] between them (SP), ring attention over the CP group (CP), and a range of
layers with or without the embedding and the head (PP). Activations are [s, b, h] inside the model. Every layer
shares the model's `ModelContext` (parallel knobs, dropout streams, MoE aux-loss state, weight-gradient deferral).
The last stage returns this rank's vocab-parallel logits; the loss is the step's business (`megalite.engine`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megalite.backends.attention import attention
from megalite.backends.documents import document_attention
from megalite.backends.norms import build_norm
from megalite.config import ModelConfig
from megalite.context import ModelContext, ParallelKnobs
from megalite.context_parallel import ring_attention
from megalite.models.mlp import MLP, output_std
from megalite.moe import MoELayer
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    initialize_parameters,
)
from megalite.tensor_parallel.layers import column_parallel_linear, sequence_parallel
from megalite.tensor_parallel.random import MODEL_RNG, TP_RNG
from megalite.tensor_parallel.sharding import set_spec

if TYPE_CHECKING:
    from megalite.inference.kv_cache import CacheStep

Rotary = tuple[torch.Tensor, torch.Tensor]


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, base: float, dtype: torch.dtype) -> Rotary:
    """cos and sin of the rotary angles for positions [b, s] -> each [s, b, 1, dim]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    angles = position_ids.t().float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate [s, b, heads, d] by the angles (halves layout: the pair of x_i is x_{i + d/2})."""
    cos, sin = rotary
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _dropout(x: torch.Tensor, p: float, training: bool, context: ModelContext, split_over_tp: bool) -> torch.Tensor:
    """Dropout drawing from the model's per-TP-rank stream when the tensor is split over the TP group, else from its
    stream shared by the TP group."""
    if p == 0.0 or not training:
        return x
    with context.rng.fork(TP_RNG if split_over_tp else MODEL_RNG):
        return F.dropout(x, p, True)


def recompute(context: ModelContext, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """Run `fn` without keeping its activations; backward recomputes it with the same random draws (and the context
    marks the recomputation, so that side effects such as token counts are not repeated)."""
    states = context.rng.state_dict()
    return checkpoint(
        fn, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), context.replaying(states)),
    )


class SelfAttention(torch.nn.Module):
    """Causal grouped-query self-attention of global layer `layer`; heads and key/value groups split over the TP
    group. With a `CacheStep` (generation) it attends over the KV cache instead of ring attention or the back-end."""

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, context: ModelContext, layer: int):
        super().__init__()
        tp = groups.size("tp")
        self.context, self.layer = context, layer
        self.head_dim = cfg.head_size
        groups_total = cfg.num_query_groups or cfg.num_attention_heads
        self.num_groups = groups_total // tp
        self.heads_per_group = cfg.num_attention_heads // groups_total
        self.dropout_p, self.backend = cfg.attention_dropout, cfg.attention_backend
        self.selective_recompute = cfg.recompute_granularity == "selective"
        self.cp_group, self.cp_ranks = groups.cp, groups.ranks["cp"]
        bias = not cfg.disable_bias_linear
        # Per key/value group: the group's query heads, then its key, then its value (TP splits whole groups).
        qkv_out = (cfg.num_attention_heads + 2 * groups_total) * self.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, groups.tp, context, bias=bias or cfg.add_qkv_bias,
                                        std=cfg.init_method_std,
                                        logical_rows=(groups_total, self.heads_per_group + 2, self.head_dim))
        self.q_norm = self.k_norm = None
        if cfg.qk_layernorm:  # one weight over the head size; each TP rank normalises other heads: summed over TP
            self.q_norm = build_norm(cfg.normalization, self.head_dim, cfg.norm_epsilon, tp > 1, cfg.apply_layernorm_1p)
            self.k_norm = build_norm(cfg.normalization, self.head_dim, cfg.norm_epsilon, tp > 1, cfg.apply_layernorm_1p)
        self.proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, groups.tp, context,
                                      bias=bias, std=output_std(cfg))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             documents: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of [b, h, s, d] tensors: ring attention over the CP group, else the back-end's kernel; with
        document ids [b, s], only within each document."""
        knobs = self.context.knobs
        if len(self.cp_ranks) > 1 and knobs.context_parallel:
            return ring_attention(q, k, v, group=self.cp_group, group_ranks=self.cp_ranks, causal=True,
                                  comm_type=knobs.cp_comm_type, documents=documents)
        p = self.dropout_p if self.training else 0.0
        kernel = functools.partial(attention, backend=self.backend) if documents is None else \
            functools.partial(document_attention, documents=documents, backend=self.backend)
        if p == 0.0:
            return kernel(q, k, v, causal=True)
        with self.context.rng.fork(TP_RNG):
            return kernel(q, k, v, causal=True, dropout_p=p)

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: CacheStep | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        s, b = qkv.shape[:2]
        # split, not three slices: its backward concatenates the three gradients once instead of zero-filling
        # and adding three qkv-sized tensors
        q, k, v = qkv.view(s, b, self.num_groups, self.heads_per_group + 2, self.head_dim).split(
            [self.heads_per_group, 1, 1], dim=3)
        # Q and K become new tensors through rotary; V is copied too, or the kernel saving it (a view) would keep
        # the whole fused QKV output alive for backward: 4 s b h / t bytes more per layer (docs/activation_memory.md)
        q, k, v = q.reshape(s, b, -1, self.head_dim), k.squeeze(3), v.squeeze(3).contiguous()
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if cache is not None:
            out = cache.attend(self.layer, q, k, v)
        elif self.selective_recompute:
            out = recompute(self.context, functools.partial(self.core, documents=documents), q, k, v)
        else:
            out = self.core(q, k, v, documents)
        return self.proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))


def build_mlp(cfg: ModelConfig, groups: ProcessGroups, context: ModelContext, layer: int) -> torch.nn.Module:
    """The feed-forward block of global layer `layer`: dense, or MoE where --moe-layer-freq says."""
    if cfg.is_moe_layer(layer):
        return MoELayer(cfg, groups, context, layer)
    return MLP(cfg, groups, context, output_std=output_std(cfg))


class TransformerLayer(torch.nn.Module):
    """x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, context: ModelContext, layer: int):
        super().__init__()
        self.context, self.tp_group = context, groups.tp
        self.hidden_dropout = cfg.hidden_dropout
        split = sequence_parallel(context, groups.tp)  # as built: norm gradients are summed over TP
        self.input_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, split, cfg.apply_layernorm_1p)
        self.attention = SelfAttention(cfg, groups, context, layer)
        self.pre_mlp_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, split,
                                       cfg.apply_layernorm_1p)
        self.mlp = build_mlp(cfg, groups, context, layer)

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: CacheStep | None = None,
                documents: torch.Tensor | None = None, replay: torch.Tensor | None = None) -> torch.Tensor:
        split = sequence_parallel(self.context, self.tp_group)
        drop = lambda t: _dropout(t, self.hidden_dropout, self.training, self.context, split)  # noqa: E731
        x = x + drop(self.attention(self.input_norm(x), rotary, cache, documents))
        h = self.pre_mlp_norm(x)
        return x + drop(self.mlp(h, replay) if isinstance(self.mlp, MoELayer) else self.mlp(h))


class GPTModel(torch.nn.Module):
    """A GPT model, or the part of one a pipeline stage holds.

    `layer_ids` are the global indices of the layers held (default: all); `pre_process` adds the embedding and
    `post_process` the final norm and output layer. Parameter names use global layer indices, so the same seed
    initialises the same model whatever the layout. The embedding and output layer have `cfg.padded_vocab_size`
    rows; the logits of the padded ids are -inf, so they take no part in any softmax. `context` is shared by every
    chunk of the model on this rank; its knobs at construction say how the model is laid out.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ProcessGroups,
        context: ModelContext,
        *,
        layer_ids: list[int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__()
        self.cfg, self.groups, self.context = cfg, groups, context
        self.pre_process, self.post_process = pre_process, post_process
        self.tied = not cfg.untie_embeddings_and_output_weights
        self.full_recompute = cfg.recompute_granularity == "full"
        layer_ids = list(range(cfg.num_layers)) if layer_ids is None else layer_ids
        vocab_size = cfg.padded_vocab_size
        if pre_process or (post_process and self.tied):
            self.embedding = VocabParallelEmbedding(vocab_size, cfg.hidden_size, groups.tp, context,
                                                    std=cfg.init_method_std)
        self.layers = torch.nn.ModuleDict({str(i): TransformerLayer(cfg, groups, context, i) for i in layer_ids})
        if post_process:
            self.final_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon,
                                         sequence_parallel(context, groups.tp), cfg.apply_layernorm_1p)
            if not self.tied:
                spec = ShardSpec((vocab_size, cfg.hidden_size), dim=0, rank=groups.rank("tp"), size=groups.size("tp"),
                                 std=cfg.init_method_std)
                self.output_weight = set_spec(torch.nn.Parameter(torch.empty(spec.local_shape)), spec)
            per_rank = vocab_size // groups.size("tp")
            first_padded = cfg.vocab_size - groups.rank("tp") * per_rank  # local index of the first padded id
            padded = torch.arange(per_rank) >= first_padded if first_padded < per_rank else None
            self.register_buffer("padded_ids", padded, persistent=False)

    def initialize(self, seed: int) -> None:
        """Every parameter: its shard of the full tensor drawn from (seed, global parameter name)."""
        initialize_parameters(list(self.named_parameters()), seed)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        knobs: ParallelKnobs | None = None,
        cache: CacheStep | None = None,
        document_ids: torch.Tensor | None = None,
        routed_experts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens/position_ids [b, s] (this CP rank's shard). First stage: from `tokens`; other stages: from `hidden`
        [s(/t), b, h]. Returns this rank's vocab-parallel logits [b, s, v/t] on the last stage, hidden states on the
        others. `knobs` replaces the context's parallel knobs for this call; `cache` (generation, with sequence
        parallelism and ring attention off) makes attention read and extend the KV cache, and the last stage return
        the last position's logits only (unless the cache step asks for all). `document_ids` [b, s] (this CP
        rank's shard; --reset-attention-mask): attention stays inside each document. `routed_experts` [b, s, MoE
        layers, k] (this CP rank's shard; routing replay): every MoE layer routes to the recorded experts."""
        with self.context.using(knobs) if knobs is not None else contextlib.nullcontext():
            return self._forward(tokens, position_ids, hidden, cache, document_ids, routed_experts)

    def _forward(self, tokens: torch.Tensor | None, position_ids: torch.Tensor | None,
                 hidden: torch.Tensor | None, cache: CacheStep | None,
                 documents: torch.Tensor | None, replay: torch.Tensor | None) -> torch.Tensor:
        split = sequence_parallel(self.context, self.groups.tp)
        if self.pre_process:
            hidden = self.embedding(tokens.t())
            hidden = _dropout(hidden, self.cfg.hidden_dropout, self.training, self.context, split)
        assert hidden is not None, "a stage without the embedding needs `hidden`"
        if position_ids is None:
            s = tokens.shape[1] if tokens is not None else hidden.shape[0] * (self.groups.size("tp") if split else 1)
            position_ids = torch.arange(s, device=hidden.device).unsqueeze(0)
        rotary = rotary_cos_sin(position_ids, self.cfg.head_size, self.cfg.rotary_base, hidden.dtype)
        for layer in self.layers.values():
            if self.full_recompute and cache is None:
                hidden = recompute(self.context, lambda h, cos, sin, layer=layer: layer(h, (cos, sin), None, documents,
                                                                                         replay), hidden, *rotary)
            else:
                hidden = layer(hidden, rotary, cache, documents, replay)
        if not self.post_process:
            return hidden
        if cache is not None and not cache.all_logits:  # generation reads the last position's logits only
            hidden = hidden[-1:]
        hidden = self.final_norm(hidden)
        weight = self.embedding.weight if self.tied else self.output_weight
        logits = column_parallel_linear(hidden, weight, None, self.groups.tp, self.context)
        if self.padded_ids is not None:
            logits = logits.masked_fill(self.padded_ids, float("-inf"))
        return logits.transpose(0, 1)
