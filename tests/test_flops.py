"""The FLOPs formula (megalite.flops) against torch's FLOP counter on megalite's own GPT model, exactly.

The counter sees matrix products only (as the formula counts), no SDPA kernel on CPU and no causal mask: the
models use the eager attention back-end (explicit Q K^T, softmax, P V), whose products the counter counts in full,
so the formula's non-causal count must match, and its causal count is half of that attention term."""
import dataclasses

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from megalite.arguments import resolve
from megalite.config import MegaliteConfig, ModelConfig, TrainingConfig
from megalite.context import ModelContext, ParallelKnobs
from megalite.flops import forward_flops, peak_tflops_of, step_flops, throughput_summary
from megalite.models.gpt import GPTModel
from megalite.tensor_parallel import RNGTracker

BATCH, SEQ = 2, 16

MODELS = {
    "dense MHA GeLU": dict(),
    "GQA": dict(num_query_groups=2, kv_channels=12),
    "SwiGLU untied": dict(swiglu=True, ffn_hidden_size=40, untie_embeddings_and_output_weights=True),
    "MoE top-2 + shared expert, mixed layers": dict(
        swiglu=True, num_query_groups=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24,
        moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True, moe_layer_freq="[1,0]"),
    "MoE top-1 GeLU, every layer": dict(num_experts=3, moe_router_topk=1, moe_ffn_hidden_size=16),
}


def config(recompute: str | None = None, **model) -> MegaliteConfig:
    """A resolved one-process config: 2 layers, hidden 32, 4 heads, a vocabulary of 100 (padded to 128)."""
    m = ModelConfig(**{**dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=100,
                              attention_backend="eager", recompute_granularity=recompute), **model})
    c, _ = resolve(MegaliteConfig(model=m, training=TrainingConfig(micro_batch_size=BATCH)), 1)
    return c


def counted(c: MegaliteConfig, groups, backward: bool) -> int:
    """FLOPs torch's counter sees in a forward (and backward) of megalite's GPT model of `c` over BATCH samples.

    Recomputation runs without torch's early stop, which ends a recomputation once the last saved tensor is back: it
    would skip eager attention's final P V product, which a fused attention kernel (what the formula assumes, and
    what GPUs run) recomputes with the rest."""
    context = ModelContext(ParallelKnobs(), RNGTracker.seeded(0, 0))
    model = GPTModel(c.model, groups, context)
    model.initialize(0)
    tokens = torch.randint(0, c.model.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, set_checkpoint_early_stop(False):
        logits = model(tokens)
        if backward:
            logits[..., :c.model.vocab_size].float().square().mean().backward()
    return counter.get_total_flops()


def full_attention(c: MegaliteConfig, samples: int = BATCH) -> int:
    """The formula's forward FLOPs with the attention counted in full (what the counter sees of eager attention)."""
    return forward_flops(c.model, samples, causal=False).total


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_matches_the_flop_counter_exactly(solo_groups, name):
    c = config(**MODELS[name])
    assert counted(c, solo_groups, backward=False) == full_attention(c)


@pytest.mark.parametrize("name", ["dense MHA GeLU", "MoE top-2 + shared expert, mixed layers"])
def test_backward_is_twice_the_forward(solo_groups, name):
    c = config(**MODELS[name])
    assert counted(c, solo_groups, backward=True) == 3 * full_attention(c)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_is_counted_in_hardware_flops_only(solo_groups, recompute):
    c = config(recompute, **MODELS["MoE top-2 + shared expert, mixed layers"])
    full = forward_flops(c.model, BATCH, causal=False)
    repeated = full.layers if recompute == "full" else full.attention_core
    assert counted(c, solo_groups, backward=True) == 3 * full.total + repeated  # what the hardware runs
    base, again = step_flops(config(**MODELS["MoE top-2 + shared expert, mixed layers"])), step_flops(c)
    causal = again.forward
    assert again.model == base.model == 3 * causal.total
    assert base.hardware == base.model
    assert again.hardware - again.model == (causal.layers if recompute == "full" else causal.attention_core)


def test_terms_by_formula():
    """Each term written out for a GQA SwiGLU MoE model; causal attention is half of full attention."""
    c = config(**MODELS["MoE top-2 + shared expert, mixed layers"])
    f, full = forward_flops(c.model, BATCH), forward_flops(c.model, BATCH, causal=False)
    t, h, s, n, g, d, L = BATCH * SEQ, 32, SEQ, 4, 2, 8, 2
    assert f.attention_projections == t * L * (2 * h * (n + 2 * g) * d + 2 * n * d * h)
    assert full.attention_core == t * L * 2 * (2 * s * n * d) and f.attention_core * 2 == full.attention_core
    dense_ffn = c.model.ffn_hidden_size  # SwiGLU default: 8/3 h rounded up to 64
    assert dense_ffn == 128
    assert f.mlp == t * (3 * 2 * h * dense_ffn + 3 * 2 * h * (2 * 24 + 40))  # layer 1 dense, layer 0 MoE
    assert f.router == t * (2 * h * 4 + 2 * h)
    assert f.output_layer == t * 2 * h * 128  # the padded vocabulary
    step = step_flops(c)
    assert step.tokens == t and step.model == 3 * f.total == 3 * (full.total - full.attention_core // 2)


def test_matches_megatrons_closed_form():
    """Megatron-LM's expression (causal attention, no router) for a dense GQA SwiGLU model at its default batch."""
    c = config(num_query_groups=2, swiglu=True, ffn_hidden_size=96, untie_embeddings_and_output_weights=True)
    b, s, L, h, n, g, f, V = BATCH, SEQ, 2, 32, 4, 2, 96, 128
    megatron = 12 * b * s * L * h * h * ((1 + g / n + s / h / 2) + f / h * 3 / 2 + V / (2 * L * h))
    assert step_flops(c).model == pytest.approx(megatron, rel=1e-12)


def test_global_batch_scales_linearly():
    c = config()
    gbs = c.training.global_batch_size
    assert step_flops(c, 3 * gbs).model == 3 * step_flops(c).model
    with pytest.raises(ValueError, match="ffn-hidden-size"):
        forward_flops(dataclasses.replace(c.model, ffn_hidden_size=None), 1)


def test_peak_table_and_mfu_text():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756
    assert peak_tflops_of("NVIDIA H200") == 989 and peak_tflops_of("NVIDIA H20") == 148
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops_of("NVIDIA A10") == 125
    assert peak_tflops_of("NVIDIA L40S") == 362 and peak_tflops_of("NVIDIA GeForce RTX 4090") == 165
    assert peak_tflops_of("NVIDIA GeForce GTX 1080") is None
    text, scalars = throughput_summary(4e12, 2.0, 2, 100.0)
    assert text == " | TFLOP/s per device 1 | MFU 1.0%" and scalars == {"tflops_per_device": 1.0, "mfu": 0.01}
    assert throughput_summary(4e12, 2.0, 2, None)[0] == " | TFLOP/s per device 1"
