"""Tiny random Hugging Face models for tests against `transformers` (a test-only dependency, imported when a model is
made): every architecture megalite imports, built in the test, never downloaded."""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=12)),  # a head size of its own: --kv-channels
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  MOE | dict(shared_expert_intermediate_size=24, num_hidden_layers=3, decoder_sparse_step=1,
                             mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", MOE | dict(norm_topk_prob=True, head_dim=12)),
}
EVEN_QWEN2_MOE = {"qwen2_moe_4_layers": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                                         ARCHITECTURES["qwen2_moe"][2] | dict(num_hidden_layers=4))}  # for PP2


def make_hf(name: str, directory: Path, vocab_size: int = 100, **save) -> torch.nn.Module:
    """A tiny random Hugging Face model of architecture `name` (every weight perturbed, so biases and norm weights
    matter), with `vocab_size` tokens, saved to `directory` (`save`: options of `save_pretrained`, e.g. shards)."""
    config_cls, model_cls, extra = (ARCHITECTURES | EVEN_QWEN2_MOE)[name]
    import transformers

    config = getattr(transformers, config_cls)(**(COMMON | extra | dict(vocab_size=vocab_size)))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(directory, **save)
    return model
