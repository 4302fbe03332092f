"""Hugging Face tensors <-> megalite's logical tensors, in both directions, box by box.

Every megalite logical tensor (see `boxes.py`) is the concatenation, along one of its dimensions, of views of
Hugging Face tensors (and, for the padded vocabulary rows, zeros): the fused QKV, [query groups, heads per group + 2,
head size, hidden], is q_proj, k_proj and v_proj viewed per query group and joined along dimension 1; SwiGLU's fc1,
[2, ffn, hidden], is gate_proj and up_proj stacked; every expert is its own tensor as on the Hub. `HFReader` reads a
box of a logical tensor by reading only the rows of the Hugging Face tensors it covers, so each rank of any layout
reads only its slices; `to_hf` turns whole logical tensors back into Hugging Face's tensors (padded rows dropped).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megalite.checkpoint.boxes import Box
from megalite.checkpoint.hf_config import architecture_for
from megalite.config import ModelConfig
from megalite.errors import CheckpointError


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Part:
    """A Hugging Face tensor (`name`; None: zeros, the padded vocabulary rows) seen as `shape`, a view of its
    `hf_shape` that splits its first dimension, as a slab of a logical tensor."""

    name: str | None
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


@dataclass(frozen=True)
class Source:
    """A logical tensor as `parts` joined along dimension `dim`."""

    dim: int
    parts: tuple[Part, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        return (*first[:self.dim], sum(p.shape[self.dim] for p in self.parts), *first[self.dim + 1:])


def _one(name: str, shape: tuple[int, ...]) -> Source:
    return Source(0, (Part(name, shape, shape),))


def _stacked(gate: str, up: str, ffn: int, h: int) -> Source:
    return Source(0, (Part(gate, (1, ffn, h), (ffn, h)), Part(up, (1, ffn, h), (ffn, h))))


def _vocabulary(name: str, m: ModelConfig) -> Source:
    rows, padded = m.vocab_size, m.padded_vocab_size
    parts = [Part(name, (rows, m.hidden_size), (rows, m.hidden_size))]
    if padded > rows:
        parts.append(Part(None, (padded - rows, m.hidden_size), (padded - rows, m.hidden_size)))
    return Source(0, tuple(parts))


def sources(m: ModelConfig) -> dict[str, Source]:
    """Every megalite logical tensor of model `m` and the Hugging Face tensors it is made of (`architecture_for`)."""
    arch = architecture_for(m)
    h, d, heads = m.hidden_size, m.head_size, m.num_attention_heads
    groups = m.num_query_groups or heads
    per_group = heads // groups
    out = {"embedding.weight": _vocabulary("model.embed_tokens.weight", m),
           "final_norm.weight": _one("model.norm.weight", (h,))}
    if m.untie_embeddings_and_output_weights:
        out["output_weight"] = _vocabulary("lm_head.weight", m)
    for i in range(m.num_layers):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        attn = f"{theirs}.self_attn"
        out[f"{ours}.input_norm.weight"] = _one(f"{theirs}.input_layernorm.weight", (h,))
        out[f"{ours}.pre_mlp_norm.weight"] = _one(f"{theirs}.post_attention_layernorm.weight", (h,))
        for kind, tail in (("weight", (h,)), ("bias", ())) if m.add_qkv_bias else (("weight", (h,)),):
            out[f"{ours}.attention.qkv.{kind}"] = Source(1, (
                Part(f"{attn}.q_proj.{kind}", (groups, per_group, d, *tail), (heads * d, *tail)),
                Part(f"{attn}.k_proj.{kind}", (groups, 1, d, *tail), (groups * d, *tail)),
                Part(f"{attn}.v_proj.{kind}", (groups, 1, d, *tail), (groups * d, *tail))))
        out[f"{ours}.attention.proj.weight"] = _one(f"{attn}.o_proj.weight", (h, heads * d))
        if m.qk_layernorm:
            out[f"{ours}.attention.q_norm.weight"] = _one(f"{attn}.q_norm.weight", (d,))
            out[f"{ours}.attention.k_norm.weight"] = _one(f"{attn}.k_norm.weight", (d,))
        if not m.is_moe_layer(i):
            ffn = m.ffn_hidden_size
            out[f"{ours}.mlp.fc1.weight"] = _stacked(f"{theirs}.mlp.gate_proj.weight", f"{theirs}.mlp.up_proj.weight",
                                                     ffn, h)
            out[f"{ours}.mlp.fc2.weight"] = _one(f"{theirs}.mlp.down_proj.weight", (h, ffn))
            continue
        ffn, mixtral = m.moe_ffn_hidden_size or m.ffn_hidden_size, arch == "MixtralForCausalLM"
        moe = f"{theirs}.block_sparse_moe" if mixtral else f"{theirs}.mlp"
        out[f"{ours}.mlp.router.weight"] = _one(f"{moe}.gate.weight", (m.num_experts, h))
        for e in range(m.num_experts):
            gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
            expert = f"{moe}.experts.{e}"
            out[f"{ours}.mlp.experts.{e}.fc1.weight"] = _stacked(f"{expert}.{gate}.weight", f"{expert}.{up}.weight",
                                                                 ffn, h)
            out[f"{ours}.mlp.experts.{e}.fc2.weight"] = _one(f"{expert}.{down}.weight", (h, ffn))
        if m.moe_shared_expert_intermediate_size:
            shared, sffn = f"{moe}.shared_expert", m.moe_shared_expert_intermediate_size
            out[f"{ours}.mlp.shared_expert.fc1.weight"] = _stacked(f"{shared}.gate_proj.weight",
                                                                   f"{shared}.up_proj.weight", sffn, h)
            out[f"{ours}.mlp.shared_expert.fc2.weight"] = _one(f"{shared}.down_proj.weight", (h, sffn))
            out[f"{ours}.mlp.shared_expert_gate"] = _one(f"{moe}.shared_expert_gate.weight", (1, h))
    return out


class HFReader(contextlib.AbstractContextManager):
    """Boxes of megalite logical tensors read from a Hugging Face model directory (`model.safetensors`, or shards
    listed in `model.safetensors.index.json`), opening only the files and reading only the rows a box needs."""

    def __init__(self, directory: Path, model: ModelConfig):
        self.directory, self.what = Path(directory), f"--load {directory}"
        self.tensors = sources(model)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.files = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{self.what}: {index} is not a safetensors index ({e})") from e
        else:
            single = self.directory / "model.safetensors"
            with self._open(single) as f:
                self.files = {key: single.name for key in f.keys()}
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.what}: {path} is not a readable safetensors file ({e})") from e

    def _handle(self, name: str):
        if name not in self.files:
            raise CheckpointError(f"{self.what}: the model has no tensor {name!r} (needed for this architecture)")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(self._open(self.directory / file))
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of logical tensor `name` (that of its first Hugging Face part)."""
        part = next(p.name for p in self.tensors[name].parts if p.name is not None)
        return _DTYPES[self._handle(part).get_slice(part).get_dtype()]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def _read_part(self, part: Part, box: Box, dtype: torch.dtype) -> torch.Tensor:
        """Box `box` (in `part.shape`) of a Hugging Face tensor: only the rows it covers are read."""
        if part.name is None:
            return torch.zeros(box.shape, dtype=dtype)
        stored = tuple(self._handle(part.name).get_slice(part.name).get_shape())
        if stored != part.hf_shape:
            raise CheckpointError(f"{self.what}: {part.name} has shape {list(stored)}, config.json implies "
                              f"{list(part.hf_shape)}")
        # the view splits the first Hugging Face dimension into `k` dimensions; the others are the same
        k = len(part.shape) - len(part.hf_shape) + 1
        split, kept = part.shape[:k], box.shape[k:]
        strides = [math.prod(split[i + 1:]) for i in range(k)]
        first = sum(o * s for o, s in zip(box.offsets[:k], strides))
        last = sum((o + n - 1) * s for o, n, s in zip(box.offsets[:k], box.shape[:k], strides)) + 1
        if last - first != math.prod(box.shape[:k]):
            raise ValueError(f"{part.name}: box {box} is not contiguous in the view {part.shape}")
        rows = slice(first, last)
        rest = tuple(slice(o, o + n) for o, n in zip(box.offsets[k:], kept))
        return self._handle(part.name).get_slice(part.name)[(rows, *rest)].reshape(box.shape).to(dtype)

    def read(self, name: str, box: Box, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.what}: megalite's {name} has no Hugging Face counterpart in this "
                                  "architecture")
        source = self.tensors[name]
        out = torch.empty(box.shape, dtype=dtype)
        offset = 0
        for part in source.parts:
            size = part.shape[source.dim]
            slab = Box(tuple(offset if i == source.dim else 0 for i in range(len(part.shape))), part.shape)
            common = slab.intersect(box)
            if common is not None:
                local = Box(tuple(o - s for o, s in zip(common.offsets, slab.offsets)), common.shape)
                out[common.within(box)] = self._read_part(part, local, dtype)
            offset += size
        return out


def to_hf(logical: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face's tensors from whole megalite logical tensors (padded vocabulary rows dropped)."""
    out = {}
    for name, source in sources(model).items():
        pieces = logical[name].split([p.shape[source.dim] for p in source.parts], dim=source.dim)
        for part, piece in zip(source.parts, pieces):
            if part.name is not None:
                out[part.name] = piece.reshape(part.hf_shape).contiguous()
    if not model.untie_embeddings_and_output_weights:
        out.pop("lm_head.weight", None)
    return out
