"""FLOPs of a training step from the config, and the peak throughput of the device, for TFLOP/s and MFU.

Conventions (Megatron-LM's `num_floating_point_operations`, with the terms it leaves out added):

- a multiply-add is 2 FLOPs: an [m, k] x [k, n] product is 2 m k n;
- only matrix products count; norms, softmax, rotary, activations, dropout, the embedding lookup and the
  optimizer are left out (they are a small share and no peak figure covers them);
- backward is twice the forward (input gradient and weight gradient), so the model FLOPs of a step are
  3 x forward over the global batch;
- causal attention does half the work of full attention: its scores and values terms are halved (the work kernels
  skip above the diagonal). Packed documents (--reset-attention-mask) are still counted as one causal sequence;
- MoE layers count the top-k experts every token is routed to (as if dropless), the shared expert, and the
  router's logits x W_r^T (and the shared-expert gate), which Megatron leaves out for non-MLA models;
- hardware FLOPs add what recomputation runs again: --recompute-granularity full one more forward of every
  transformer layer (not the output layer), selective one more forward of the attention core.

Per token and layer, forward, with h hidden size, n query heads, g key/value groups, d head size, s sequence
length, f (dense) / f_e (expert) / f_s (shared expert) hidden sizes, k experts per token, E experts, V the padded
vocabulary, and m = 3 for SwiGLU (gate, up, down) or 2 for GeLU (fc1, fc2):

    attention projections  2 h (n + 2 g) d  (QKV)  +  2 n d h  (output projection)
    attention core         2 s n d  (Q K^T)  +  2 s n d  (P V),  halved for causal attention
    dense MLP              2 m h f
    MoE layer              2 m h f_e k  +  2 m h f_s  (experts, shared expert)
    router                 2 h E  (+ 2 h for the shared-expert gate)
    output layer           2 h V  (once per token, not per layer)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megalite.config import MegaliteConfig, ModelConfig


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of a number of sequences through the whole model, by term (see the module docstring)."""

    attention_projections: int
    """QKV and output projections of every layer."""
    attention_core: int
    """Scores Q K^T and values P V of every layer (halved when causal)."""
    mlp: int
    """Dense MLPs, the routed experts (top-k per token) and the shared experts."""
    router: int
    """MoE routers' logits and shared-expert gates."""
    output_layer: int
    """The logits: final hidden states x the (padded) vocabulary."""

    @property
    def layers(self) -> int:
        """Everything inside the transformer layers (what full recomputation runs again)."""
        return self.attention_projections + self.attention_core + self.mlp + self.router

    @property
    def total(self) -> int:
        return self.layers + self.output_layer


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step over the global batch (all ranks together)."""

    forward: ForwardFlops
    """One forward pass over the global batch, causal attention."""
    model: int
    """Model FLOPs: 3 x forward (forward, and a backward of twice the forward); MFU divides these."""
    hardware: int
    """Model FLOPs plus the forward work recomputation repeats."""
    tokens: int
    """Tokens of the global batch (global batch size x sequence length)."""


def forward_flops(m: ModelConfig, samples: int, seq_length: int | None = None, causal: bool = True) -> ForwardFlops:
    """Forward FLOPs of `samples` sequences of `seq_length` tokens (default --seq-length) through the model of
    `m` (a resolved config: --ffn-hidden-size and the vocabulary size known). `causal=False` counts full
    attention, as an eager attention's matrix products do."""
    s = seq_length or m.seq_length
    tokens = samples * s
    h, n, d = m.hidden_size, m.num_attention_heads, m.head_size
    g = m.num_query_groups or n
    mats = 3 if m.swiglu else 2
    if m.ffn_hidden_size is None:
        raise ValueError("--ffn-hidden-size is not known yet: pass a resolved config (megalite.arguments.resolve)")
    projections = 2 * h * (n + 2 * g) * d + 2 * n * d * h
    core = 4 * s * n * d if not causal else 2 * s * n * d
    dense_mlp = 2 * mats * h * m.ffn_hidden_size
    moe_mlp = router = 0
    if m.num_experts:
        expert = m.moe_ffn_hidden_size or m.ffn_hidden_size
        moe_mlp = 2 * mats * h * expert * m.moe_router_topk
        moe_mlp += 2 * mats * h * (m.moe_shared_expert_intermediate_size or 0)
        router = 2 * h * m.num_experts + (2 * h if m.moe_shared_expert_gate else 0)
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.num_layers))
    dense_layers = m.num_layers - moe_layers
    return ForwardFlops(
        attention_projections=tokens * m.num_layers * projections,
        attention_core=tokens * m.num_layers * core,
        mlp=tokens * (dense_layers * dense_mlp + moe_layers * moe_mlp),
        router=tokens * moe_layers * router,
        output_layer=tokens * 2 * h * m.padded_vocab_size,
    )


def step_flops(config: MegaliteConfig, global_batch_size: int | None = None) -> StepFlops:
    """Model and hardware FLOPs of one optimizer step of `config` (resolved: its --global-batch-size is used unless
    `global_batch_size` is given)."""
    m = config.model
    samples = global_batch_size or config.training.global_batch_size
    if not samples:
        raise ValueError("the global batch size is not known yet: pass a resolved config or global_batch_size")
    forward = forward_flops(m, samples)
    recomputed = {"full": forward.layers, "selective": forward.attention_core}.get(m.recompute_granularity, 0)
    model = 3 * forward.total
    return StepFlops(forward=forward, model=model, hardware=model + recomputed, tokens=samples * m.seq_length)


# Dense (no sparsity) BF16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, which quote them "with
# sparsity" (halved here): H100 and H200 data sheets (SXM 1979, PCIe 1513, NVL 1671), A100 data sheet (624),
# L40S data sheet (733), A10 data sheet (250); the Ada architecture white paper for the RTX 4090 (165.2 with FP32
# accumulation, which BF16 uses); the H20 (148 dense) from its product brief as published by NVIDIA's partners.
# First match wins: patterns are searched in torch.cuda.get_device_name(), case-insensitively.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b", 989.0),
    (r"\bH20\b", 148.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX 4090\b", 165.0),
)


def peak_tflops_of(device_name: str) -> float | None:
    """The dense BF16 peak of the GPU named `device_name` from `PEAK_BF16_TFLOPS`; None when it is not listed."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def device_peak_tflops(flag: float | None, device: torch.device) -> float | None:
    """Peak TFLOP/s of one device for MFU: --peak-tflops when given, else the table's entry for a CUDA device;
    None (no MFU) on CPU and on GPUs the table does not list."""
    if flag:
        return flag
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def throughput_summary(flops: float, seconds: float, world_size: int, peak: float | None) -> tuple[str, dict]:
    """' | TFLOP/s per device X' (and ' | MFU Y%' when the peak is known) for `flops` done in `seconds` by
    `world_size` devices, and the same values as log scalars."""
    tflops = flops / max(seconds, 1e-9) / world_size / 1e12
    text, scalars = f" | TFLOP/s per device {tflops:.3g}", {"tflops_per_device": tflops}
    if peak:
        text += f" | MFU {100 * tflops / peak:.1f}%"
        scalars["mfu"] = tflops / peak
    return text, scalars
