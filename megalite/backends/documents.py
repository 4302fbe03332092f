"""Attention that stays inside documents: several sequences packed into one row (SFT packing, pretraining with
--reset-attention-mask) attend only within their own document.

Documents are given per token as ids [b, s] (equal ids: one document; ids never decrease along a row). Back-ends:
- eager and sdpa: a block-diagonal causal boolean mask [b, 1, s, s] (`document_mask`);
- flash (flash-attn, CUDA): the variable-length kernel over the documents of all rows, flattened
  (`flash_attn_varlen_func` with cumulative document lengths), no mask materialised;
- te: refused (its padding masks are not wired here), with the back-ends that work.
Under context parallelism, ring attention takes the same ids (its blocks are masked the same way).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from megalite.backends.attention import (
    _SDPA_HAS_GQA,
    _check,
    _eager_attention,
    _require_cuda_package,
    _scale,
    document_mask,
    expand_kv,
    resolve_backend,
)


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen_func() -> Callable | None:
    """flash-attn's `flash_attn_varlen_func`, or None when the package is not importable."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def document_offsets(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative lengths [n + 1] int32 of the n documents of all rows flattened row after row, the longest)."""
    b, s = documents.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)
    offsets = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor, causal: bool,
                  scale: float, dropout_p: float) -> torch.Tensor:
    b, hq, s, d = q.shape
    offsets, longest = document_offsets(documents)
    flat = lambda x: x.transpose(1, 2).reshape(b * s, x.size(1), d)  # noqa: E731  [tokens, heads, d]
    out = _flash_attn_varlen_func()(flat(q), flat(k), flat(v), offsets, offsets, longest, longest,
                                    dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    return out.view(b, s, hq, d).transpose(1, 2)


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor, *, causal: bool = True,
    scale: float | None = None, dropout_p: float = 0.0, backend: str = "auto",
) -> torch.Tensor:
    """Differentiable attention of q [b, hq, s, d] over k, v [b, hkv, s, d] within the documents [b, s]."""
    _check(q, k, v, causal)
    if documents.shape != (q.size(0), q.size(2)):
        raise ValueError(f"document ids {tuple(documents.shape)} do not match the queries' [b, s] "
                         f"{(q.size(0), q.size(2))}")
    scale = _scale(q, scale)
    name = resolve_backend(backend, q)
    if name == "te":
        raise ValueError("--reset-attention-mask (attention within documents) is not supported with "
                         "--attention-backend te; use flash, sdpa or eager")
    if name == "flash":
        _require_cuda_package(name, _flash_attn_varlen_func() is not None, q)
        return _flash_varlen(q, k, v, documents, causal, scale, dropout_p)
    mask = document_mask(documents, documents, causal)
    if name == "eager":
        return _eager_attention(q, k, v, False, scale, dropout_p, mask)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=k.size(1) != q.size(1))
    hq = q.size(1)
    return F.scaled_dot_product_attention(q, expand_kv(k, hq), expand_kv(v, hq), attn_mask=mask,
                                          dropout_p=dropout_p, scale=scale)
