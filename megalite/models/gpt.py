"""The one GPT model: token embedding, pre-norm transformer layers with rotary grouped-query attention and a
GeLU or SwiGLU MLP, final norm, output layer tied or untied to the embedding, per-token causal LM loss.

Parallelism shows up only as the layer classes and the groups they are given: column/row-parallel linears (TP),
sequence-parallel activations [s/t, b, h] between them (SP), ring attention over the CP group (CP), and a range of
layers with or without the embedding and the head (PP). Activations are [s, b, h] inside the model.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megalite.backends.attention import attention
from megalite.backends.norms import build_norm
from megalite.config import ModelConfig
from megalite.context_parallel import ring_attention
from megalite.models.mlp import build_mlp, output_std
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    get_rng_tracker,
    initialize_parameters,
    vocab_parallel_cross_entropy,
)
from megalite.tensor_parallel.layers import column_parallel_linear
from megalite.tensor_parallel.sharding import set_spec

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


def _dropout(x: torch.Tensor, p: float, training: bool, split_over_tp: bool) -> torch.Tensor:
    """Dropout drawing from the per-TP-rank generator when the tensor is split over the TP group."""
    if p == 0.0 or not training:
        return x
    if split_over_tp:
        with get_rng_tracker().fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


@contextlib.contextmanager
def _replaying_tracker(states: dict[str, torch.Tensor]) -> Iterator[None]:
    """During recomputation, draw from the tracker states the original forward started with."""
    tracker = get_rng_tracker()
    current = tracker.state_dict()
    tracker.load_state_dict(states)
    try:
        yield
    finally:
        tracker.load_state_dict(current)


def recompute(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """Run `fn` without keeping its activations; backward recomputes it with the same random draws."""
    states = get_rng_tracker().state_dict()
    return checkpoint(
        fn, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _replaying_tracker(states)),
    )


class SelfAttention(torch.nn.Module):
    """Causal grouped-query self-attention; heads and key/value groups split over the TP group."""

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, *, sequence_parallel: bool, cp_comm_type: str,
                 output_std: float):
        super().__init__()
        tp = groups.size("tp")
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.num_groups = (cfg.num_query_groups or cfg.num_attention_heads) // tp
        self.heads_per_group = cfg.num_attention_heads // (cfg.num_query_groups or cfg.num_attention_heads)
        self.dropout_p, self.backend = cfg.attention_dropout, cfg.attention_backend
        self.selective_recompute = cfg.recompute_granularity == "selective"
        self.cp_group, self.cp_ranks, self.cp_comm_type = groups.cp, groups.ranks["cp"], cp_comm_type
        bias = not cfg.disable_bias_linear
        # Per key/value group: the group's query heads, then its key, then its value (TP splits whole groups).
        qkv_out = (cfg.num_attention_heads + 2 * (cfg.num_query_groups or cfg.num_attention_heads)) * self.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, groups.tp, bias=bias,
                                        sequence_parallel=sequence_parallel, std=cfg.init_method_std)
        self.proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, groups.tp, bias=bias,
                                      sequence_parallel=sequence_parallel, std=output_std)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of [b, h, s, d] tensors: ring attention over the CP group, else the back-end's kernel."""
        if len(self.cp_ranks) > 1:
            return ring_attention(q, k, v, group=self.cp_group, group_ranks=self.cp_ranks, causal=True,
                                  comm_type=self.cp_comm_type)
        p = self.dropout_p if self.training else 0.0
        if p == 0.0:
            return attention(q, k, v, causal=True, backend=self.backend)
        with get_rng_tracker().fork():
            return attention(q, k, v, causal=True, dropout_p=p, backend=self.backend)

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        qkv = self.qkv(x)
        s, b = qkv.shape[:2]
        # split, not three slices: its backward concatenates the three gradients once instead of zero-filling
        # and adding three qkv-sized tensors
        q, k, v = qkv.view(s, b, self.num_groups, self.heads_per_group + 2, self.head_dim).split(
            [self.heads_per_group, 1, 1], dim=3)
        # Q and K become new tensors through rotary; V is copied too, or the kernel saving it (a view) would keep
        # the whole fused QKV output alive for backward: 4 s b h / t bytes more per layer (docs/activation_memory.md)
        q, k, v = q.reshape(s, b, -1, self.head_dim), k.squeeze(3), v.squeeze(3).contiguous()
        q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = recompute(self.core, q, k, v) if self.selective_recompute else self.core(q, k, v)
        return self.proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))


class TransformerLayer(torch.nn.Module):
    """x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, mlp: torch.nn.Module, *, sequence_parallel: bool,
                 cp_comm_type: str):
        super().__init__()
        self.sequence_parallel = sequence_parallel and groups.size("tp") > 1
        self.hidden_dropout = cfg.hidden_dropout
        self.input_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, self.sequence_parallel)
        self.attention = SelfAttention(cfg, groups, sequence_parallel=sequence_parallel, cp_comm_type=cp_comm_type,
                                       output_std=output_std(cfg))
        self.pre_mlp_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, self.sequence_parallel)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        drop = lambda t: _dropout(t, self.hidden_dropout, self.training, self.sequence_parallel)  # noqa: E731
        x = x + drop(self.attention(self.input_norm(x), rotary))
        return x + drop(self.mlp(self.pre_mlp_norm(x)))


class GPTModel(torch.nn.Module):
    """A GPT model, or the part of one a pipeline stage holds.

    `layer_ids` are the global indices of the layers held (default: all); `pre_process` adds the embedding and
    `post_process` the final norm, output layer and loss. Parameter names use global layer indices, so the same
    seed initialises the same model whatever the layout. `vocab_size` is the padded vocabulary.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ProcessGroups,
        *,
        vocab_size: int,
        sequence_parallel: bool = False,
        cp_comm_type: str = "p2p",
        layer_ids: list[int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel and groups.size("tp") > 1
        self.tied = not cfg.untie_embeddings_and_output_weights
        self.full_recompute = cfg.recompute_granularity == "full"
        layer_ids = list(range(cfg.num_layers)) if layer_ids is None else layer_ids
        if pre_process or (post_process and self.tied):
            self.embedding = VocabParallelEmbedding(vocab_size, cfg.hidden_size, groups.tp,
                                                    sequence_parallel=self.sequence_parallel,
                                                    std=cfg.init_method_std)
        self.layers = torch.nn.ModuleDict({
            str(i): TransformerLayer(cfg, groups, build_mlp(cfg, groups, i, self.sequence_parallel),
                                     sequence_parallel=self.sequence_parallel, cp_comm_type=cp_comm_type)
            for i in layer_ids
        })
        if post_process:
            self.final_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon, self.sequence_parallel)
            if not self.tied:
                spec = ShardSpec((vocab_size, cfg.hidden_size), dim=0, rank=groups.rank("tp"), size=groups.size("tp"),
                                 std=cfg.init_method_std)
                self.output_weight = set_spec(torch.nn.Parameter(torch.empty(spec.local_shape)), spec)

    def initialize(self, seed: int) -> None:
        """Every parameter: its shard of the full tensor drawn from (seed, global parameter name)."""
        initialize_parameters(list(self.named_parameters()), seed)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens/position_ids/labels [b, s] (this CP rank's shard). First stage: from `tokens`; other stages: from
        `hidden` [s(/t), b, h]. Returns per-token fp32 losses [b, s] with `labels` on the last stage, logits
        [b, s, v/t] without, and hidden states on the other stages."""
        if self.pre_process:
            hidden = self.embedding(tokens.t())
            hidden = _dropout(hidden, self.cfg.hidden_dropout, self.training, self.sequence_parallel)
        assert hidden is not None, "a stage without the embedding needs `hidden`"
        if position_ids is None:
            s = tokens.shape[1] if tokens is not None else hidden.shape[0] * (self.groups.size("tp") if
                                                                              self.sequence_parallel else 1)
            position_ids = torch.arange(s, device=hidden.device).unsqueeze(0)
        head_dim = self.cfg.hidden_size // self.cfg.num_attention_heads
        rotary = rotary_cos_sin(position_ids, head_dim, self.cfg.rotary_base, hidden.dtype)
        for layer in self.layers.values():
            if self.full_recompute:
                hidden = recompute(lambda h, cos, sin, layer=layer: layer(h, (cos, sin)), hidden, *rotary)
            else:
                hidden = layer(hidden, rotary)
        if not self.post_process:
            return hidden
        hidden = self.final_norm(hidden)
        weight = self.embedding.weight if self.tied else self.output_weight
        logits = column_parallel_linear(hidden, weight, None, self.groups.tp, self.sequence_parallel)
        if labels is None:
            return logits.transpose(0, 1)
        return vocab_parallel_cross_entropy(logits, labels.t(), self.groups.tp).t()
