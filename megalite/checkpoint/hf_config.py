"""Hugging Face `config.json` <-> megalite's model flags, for the architectures megalite imports and exports.

| architecture | what it sets beyond a Llama |
| --- | --- |
| `LlamaForCausalLM` | (RMSNorm, rotary, SwiGLU, grouped-query attention, tied or untied output layer) |
| `Qwen2ForCausalLM` | bias on Q/K/V only: `--add-qkv-bias` |
| `Qwen3ForCausalLM` | per-head RMSNorm on Q and K: `--qk-layernorm`; its own head size: `--kv-channels` |
| `MixtralForCausalLM` | MoE on every layer, softmax over the experts then the top-k renormalised |
| `Qwen2MoeForCausalLM` | Qwen2's attention; MoE where `(i+1) % decoder_sparse_step == 0` and i is not in `mlp_only_layers` (the list form of `--moe-layer-freq`); `norm_topk_prob=False` is `--moe-router-pre-softmax`; a shared expert with a sigmoid gate: `--moe-shared-expert-gate` |
| `Qwen3MoeForCausalLM` | Qwen3's attention, the Qwen MoE layer pattern and top-k normalisation, no shared expert |

Anything these classes allow that megalite does not compute (a non-SwiGLU activation, biases elsewhere, sliding
windows, rotary scaling such as Llama-3.1's `llama3`) is refused naming the config field.
"""
from __future__ import annotations

import json
from pathlib import Path

from megalite.config import ModelConfig, moe_layer_pattern
from megalite.validation import ConfigError, flag_name

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM",
                 "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe"}
MOE = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
QWEN_MOE = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def is_hf_directory(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json and safetensors weights."""
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from e
    architecture_of(config, path)
    return config


def architecture_of(config: dict, where: str | Path = "config.json") -> str:
    names = config.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ConfigError(f"{where}: architectures {names} is not supported; megalite imports "
                          f"{', '.join(ARCHITECTURES)}")
    return names[0]


def _rotary(config: dict, where: str) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"{where}: rotary scaling {kind!r} (rope_scaling / rope_parameters) is not supported; "
                          "megalite computes plain rotary embeddings")
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _refuse(config: dict, where: str, field: str, allowed: object, why: str) -> None:
    if config.get(field) not in (None, allowed):
        raise ConfigError(f"{where}: {field} = {config[field]!r} is not supported ({why})")


def model_fields(config: dict, where: str = "config.json") -> dict[str, object]:
    """The megalite model fields (ModelConfig names) that reproduce a Hugging Face model's `config.json`."""
    arch = architecture_of(config, where)
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (megalite's gated MLP is "
                          "SwiGLU: silu)")
    _refuse(config, where, "mlp_bias", False, "no MLP biases")
    _refuse(config, where, "use_sliding_window", False, "no sliding-window attention")
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        _refuse(config, where, "attention_bias", False, "a bias on the output projection")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    fields: dict[str, object] = {
        "num_layers": config["num_hidden_layers"], "hidden_size": hidden, "num_attention_heads": heads,
        "num_query_groups": config.get("num_key_value_heads") or heads,
        "kv_channels": head_dim if head_dim * heads != hidden else None,
        "ffn_hidden_size": config["intermediate_size"], "vocab_size": config["vocab_size"],
        "normalization": "RMSNorm", "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)), "swiglu": True,
        "rotary_base": _rotary(config, where),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
        "disable_bias_linear": True, "add_qkv_bias": arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"),
        "qk_layernorm": arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
    }
    if arch in MOE:
        layers = config["num_hidden_layers"]
        fields |= {"num_experts": config.get("num_local_experts") or config["num_experts"],
                   "moe_router_topk": config["num_experts_per_tok"], "moe_router_score_function": "softmax"}
        if arch == "MixtralForCausalLM":
            fields |= {"moe_ffn_hidden_size": config["intermediate_size"], "moe_router_pre_softmax": False,
                       "moe_layer_freq": "1"}
        else:
            step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
            pattern = [int((i + 1) % step == 0 and i not in dense) for i in range(layers)]
            fields |= {"moe_ffn_hidden_size": config["moe_intermediate_size"],
                       "moe_router_pre_softmax": not config.get("norm_topk_prob", False),
                       "moe_layer_freq": "1" if all(pattern) else str(pattern).replace(" ", "")}
        if arch == "Qwen2MoeForCausalLM" and config.get("shared_expert_intermediate_size"):
            fields |= {"moe_shared_expert_intermediate_size": config["shared_expert_intermediate_size"],
                       "moe_shared_expert_gate": True}
    return fields


def flags_of(fields: dict[str, object]) -> list[str]:
    """The command-line flags that set `fields` (as `megalite train` would take them)."""
    out: list[str] = []
    for name, value in fields.items():
        if value is True:
            out.append(flag_name(name))
        elif value not in (None, False):
            out += [flag_name(name), str(value)]
    return out


def architecture_for(m: ModelConfig) -> str:
    """The Hugging Face architecture that computes what megalite model `m` computes; ConfigError if none does."""
    dense_pattern = [m.is_moe_layer(i) for i in range(m.num_layers)]
    problems = []
    if not m.swiglu or m.normalization != "RMSNorm" or not m.disable_bias_linear:
        problems.append("Hugging Face's Llama family needs --swiglu, RMSNorm and --disable-bias-linear")
    if m.moe_router_score_function != "softmax" or m.moe_router_enable_expert_bias:
        problems.append("the exported routers use softmax scores and no expert bias")
    if m.num_experts and m.moe_shared_expert_intermediate_size and not m.moe_shared_expert_gate:
        problems.append("a shared expert is exported only with its gate (Qwen2-MoE)")
    if m.apply_layernorm_1p:
        problems.append("Hugging Face's norms scale by their weight, not by 1 + weight (--apply-layernorm-1p)")
    if problems:
        raise ConfigError("cannot export to Hugging Face: " + "; ".join(problems))
    if not m.num_experts:
        if m.add_qkv_bias and m.qk_layernorm:
            raise ConfigError("cannot export to Hugging Face: no architecture has both Q/K/V biases and Q/K norms")
        return "Qwen3ForCausalLM" if m.qk_layernorm else "Qwen2ForCausalLM" if m.add_qkv_bias else "LlamaForCausalLM"
    if m.moe_shared_expert_gate:
        return "Qwen2MoeForCausalLM"
    if m.qk_layernorm:
        return "Qwen3MoeForCausalLM"
    if all(dense_pattern) and not m.moe_router_pre_softmax and not m.add_qkv_bias:
        return "MixtralForCausalLM"
    raise ConfigError("cannot export to Hugging Face: this MoE model matches none of Mixtral, Qwen2-MoE, Qwen3-MoE")


def hf_config(m: ModelConfig, torch_dtype: str = "float32") -> dict:
    """A `config.json` for model `m` (see `architecture_for`)."""
    arch = architecture_for(m)
    config = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch], "hidden_act": "silu",
        "num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads, "head_dim": m.head_size,
        "intermediate_size": m.ffn_hidden_size, "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_base},
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights, "attention_dropout": 0.0,
        "max_position_embeddings": m.seq_length, "torch_dtype": torch_dtype, "dtype": torch_dtype,
    }
    if arch == "MixtralForCausalLM":
        config |= {"num_local_experts": m.num_experts, "num_experts_per_tok": m.moe_router_topk,
                   "intermediate_size": m.moe_ffn_hidden_size, "output_router_logits": False}
    elif arch in QWEN_MOE:
        pattern = moe_layer_pattern(m.moe_layer_freq, m.num_layers)
        config |= {"num_experts": m.num_experts, "num_experts_per_tok": m.moe_router_topk,
                   "moe_intermediate_size": m.moe_ffn_hidden_size, "norm_topk_prob": not m.moe_router_pre_softmax,
                   "decoder_sparse_step": 1, "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
                   "output_router_logits": False}
        if arch == "Qwen2MoeForCausalLM":
            config["shared_expert_intermediate_size"] = m.moe_shared_expert_intermediate_size
    if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        config["use_sliding_window"] = False
    return config
