"""Per-rank memory estimate printed at start-up: model states counted exactly from this rank's parameters,
activations from what megalite's layer saves for backward (`layer_activation_bytes`), in the style of Korthikanti
et al. (2022) with the attention core not saved (fused kernels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megalite.arguments import Derived
from megalite.backends.blocked_attention import MAX_SCORES, kept_probabilities
from megalite.config import MegaliteConfig, ModelConfig
from megalite.tensor_parallel.sharding import get_spec

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def line(self) -> str:
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        return (f"memory estimate per rank: weights {self.params / size:.2f} {unit} + fp32 grads "
                f"{self.grads / size:.2f} + optimizer {self.optimizer / size:.2f} + activations "
                f"{self.activations / size:.2f} = {self.total / size:.2f} {unit}")


def layer_activation_bytes(model: ModelConfig, *, seq: int, micro_batch: int, tp: int, sequence_parallel: bool,
                           dtype_bytes: int, device_type: str, query_groups: int, ffn_hidden_size: int,
                           selective: bool = False, moe: bool = False, expert_tp: int = 1,
                           expert_parallel: int = 1, blocked_attention: bool = False) -> float:
    """Bytes one transformer layer keeps for backward on one rank, item by item as megalite's layer saves them
    with a fused attention kernel (SDPA, flash-attn, TE, or ring attention: no s x s matrix is kept).

    `seq` is the sequence on this rank (after CP). Outside the tensor-parallel region (the inputs of the two norms,
    of the QKV linear and of the MLP, the two dropout masks) tokens are split by sequence parallelism; inside it
    (Q, K, V, the attention output that is also the projection's input, the log-sum-exp, the MLP's inner
    activations) the widths are split by TP. Device-dependent widths: dropout keeps a bool mask on CUDA and a noise tensor of the
    activation dtype on CPU; LayerNorm keeps its per-token mean and 1/std in float32 on CUDA and in the activation
    dtype on CPU; megalite's RMSNorm keeps one float32 per token. `blocked_attention`: the CPU kernel of short
    fp32 causal attention (megalite/backends/blocked_attention.py) keeps its probabilities instead of the
    log-sum-exp. With `moe` the MLP is the MoE layer
    (`moe_layer_bytes`). Checked to the byte against the saved-tensor count of `megalite bench memory` on CPU
    (tests/test_memory_estimate.py)."""
    w, h = dtype_bytes, model.hidden_size
    cuda = device_type == "cuda"
    tokens = seq * micro_batch
    local = tokens / (tp if sequence_parallel else 1)
    head_dim = model.head_size
    outside = local * h * 3 * w  # the inputs of the two norms and of the QKV linear
    if model.hidden_dropout > 0:
        outside += 2 * local * h * (1 if cuda else w)
    per_norm_stats = 2 * (4 if cuda else w) if model.normalization == "LayerNorm" else 4
    outside += 2 * local * per_norm_stats
    heads, kv_heads = model.num_attention_heads / tp, query_groups / tp
    attention = tokens * head_dim * w * (2 * heads + 2 * kv_heads)  # Q, K, V; the output (= projection input)
    attention += 2 * seq * head_dim * w  # rotary cos and sin tables, whole on every rank
    if model.qk_layernorm:  # the norms' inputs (Q and K before the norm) and their statistics (not byte-checked)
        attention += tokens * head_dim * w * (heads + kv_heads) + tokens * (heads + kv_heads) * 4
    if not selective and blocked_attention:
        attention += w * micro_batch * heads * kept_probabilities(seq)
    elif not selective:
        attention += 4 * micro_batch * heads * seq  # float32 log-sum-exp
    if moe:
        mlp = moe_layer_bytes(model, tokens=tokens, tp=tp, sequence_parallel=sequence_parallel, dtype_bytes=w,
                              expert_tp=expert_tp, expert_parallel=expert_parallel)
    else:
        mlp = local * h * w + _mlp_inner_bytes(model, tokens, ffn_hidden_size / tp, w)  # fc1 input, inner
    return outside + attention + mlp


def _mlp_inner_bytes(model: ModelConfig, rows: float, width: float, w: int) -> float:
    """An MLP's activations between fc1 and fc2 for `rows` rows of `width` hidden units: SwiGLU keeps fc1's
    [gate; up] output, silu(gate) and the product (fc2's input); GeLU its input and output."""
    return rows * width * w * (4 if model.swiglu else 2)


def moe_layer_bytes(model: ModelConfig, *, tokens: int, tp: int, sequence_parallel: bool, dtype_bytes: int,
                    expert_tp: int, expert_parallel: int = 1) -> float:
    """Bytes an MoE layer keeps for backward on one rank (dropless; softmax router, the default), when every
    expert receives its average share of rows (the total over the EP group is exact).

    Each TP rank routes its own T = tokens / tp; the experts see R = T k x ETP rows (gathered over ETP)."""
    w, h, k = dtype_bytes, model.hidden_size, model.moe_router_topk
    routed = tokens / tp
    pairs = routed * k
    rows = pairs * expert_tp
    # the router's input: without SP, this rank's 1/tp of the tokens is a view that keeps the whole sequence alive
    # (shared with the shared expert's fc1 input); with SP, the local tokens
    out = tokens / (tp if sequence_parallel else 1) * h * w
    out += routed * (4 * model.num_experts + 12 * k + 4)  # fp32 probabilities, top-k indices and weights
    # int64 permutation indices of dispatch and combine; the local-expert sort of arrivals only with EP or ETP
    out += 8 * (2 * pairs + (2 * rows if expert_parallel > 1 or expert_tp > 1 else 0))
    out += rows * h * w + _mlp_inner_bytes(model, rows, model.moe_ffn_hidden_size / expert_tp, w)  # experts
    out += pairs * (h + 1) * w  # the rows the combine weights, and their routing weights
    shared = model.moe_shared_expert_intermediate_size
    if shared:
        out += _mlp_inner_bytes(model, tokens, shared / tp, w)
    return out


def estimate_memory(params: list[torch.nn.Parameter], config: MegaliteConfig, derived: Derived,
                    in_flight_microbatches: float, layers_on_rank: int, has_output_layer: bool,
                    device_type: str) -> MemoryEstimate:
    """Weights in their dtype, fp32 main gradients, AdamW moments (+ fp32 main weights in bf16/fp16; with the
    distributed optimizer, a 1/g share over each parameter's data-parallel group), and the activations of
    `in_flight_microbatches` microbatches through `layers_on_rank` layers.

    Per layer: `layer_activation_bytes` (dense or MoE, checked to the byte on CPU; assumes a fused attention kernel
    and, for MoE, a balanced load); with --recompute-granularity full, each layer keeps only its input, plus one
    layer recomputed at a time. Plus
    the output layer's logits on the last stage: s b v/t of them in the model's dtype, in fp32 for the loss, and
    the fp32 softmax saved for backward (measured on an H100 at v = 151936, s = 8192: without this term the
    estimate missed 12.5 of 44 GiB)."""
    p, m, t = config.parallel, config.model, config.training
    n = sum(x.numel() for x in params)
    width = params[0].element_size() if params else 4
    mixed = t.bf16 or t.fp16
    dp_sizes = {"dp_cp": derived.data_parallel_size * p.context_parallel_size,
                "edp": derived.expert_data_parallel_size}
    optimizer = sum(x.numel() / (dp_sizes[get_spec(x).data_parallel_group] if t.use_distributed_optimizer else 1)
                    for x in params) * (8 + (4 if mixed else 0))
    s = m.seq_length // p.context_parallel_size
    b = t.micro_batch_size
    tp = p.tensor_model_parallel_size
    sp = p.sequence_parallel and tp > 1
    # the 'auto' attention on CPU for short fp32 causal sequences without dropout, CP or documents
    blocked = (device_type == "cpu" and m.attention_backend == "auto" and m.attention_dropout == 0 and width >= 4
               and p.context_parallel_size == 1 and not config.data.reset_attention_mask
               and b * (m.num_attention_heads // tp) * s * s <= MAX_SCORES)
    per_layer = layer_activation_bytes(
        m, seq=s, micro_batch=b, tp=tp, sequence_parallel=sp, dtype_bytes=width, device_type=device_type,
        query_groups=derived.num_query_groups, ffn_hidden_size=derived.ffn_hidden_size,
        selective=m.recompute_granularity == "selective", blocked_attention=blocked,
    )
    if m.num_experts:  # the share of MoE layers (--moe-layer-freq), averaged over the layers
        moe_layer = layer_activation_bytes(
            m, seq=s, micro_batch=b, tp=tp, sequence_parallel=sp, dtype_bytes=width, device_type=device_type,
            query_groups=derived.num_query_groups, ffn_hidden_size=derived.ffn_hidden_size,
            selective=m.recompute_granularity == "selective", moe=True,
            expert_tp=derived.expert_tensor_parallel_size, expert_parallel=p.expert_model_parallel_size,
            blocked_attention=blocked,
        )
        moe_share = sum(m.is_moe_layer(i) for i in range(m.num_layers)) / m.num_layers
        per_layer += (moe_layer - per_layer) * moe_share
    layer_input = s * b * m.hidden_size * width / (tp if sp else 1)
    if m.recompute_granularity == "full":
        activations = (layer_input * layers_on_rank + per_layer) * in_flight_microbatches
    else:
        activations = per_layer * layers_on_rank * in_flight_microbatches
    if has_output_layer:
        activations += s * b * (m.padded_vocab_size // tp) * (width + 8)
    return MemoryEstimate(params=n * width, grads=n * 4, optimizer=optimizer, activations=activations)
