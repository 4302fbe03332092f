"""Attention kernels behind one interface, and the log-sum-exp forms that ring attention is built from.

Layout everywhere: q [b, hq, s_q, d], k and v [b, hkv, s_k, d] with hq % hkv == 0 (grouped-query attention: query
head i reads K/V head i // (hq // hkv)); outputs [b, hq, s_q, d]; lse [b, hq, s_q], the natural-log log-sum-exp of
the scaled scores over the keys attended, in float32 (float64 for float64 inputs).

- `attention`: ordinary differentiable attention (CP = 1) on the back-end named by `ModelConfig.attention_backend`.
- `attention_forward_with_lse` / `attention_backward_with_lse`: one block of attention with no autograd graph, for
  custom autograd functions that merge blocks (ring attention). The backward takes the FINAL (merged) out and lse,
  so each block's gradients follow from the flash-attention identity dS = P * (dP - rowsum(dout * out)),
  P = exp(S * scale - lse).

`causal` always means the lower-triangular mask of equal-length q and k (a diagonal block). Kernels: on CPU megalite's
blocked causal attention for short fp32 sequences (`attention` with 'auto') and PyTorch's flash op otherwise, on
CUDA SDPA's flash (fp16/bf16) or memory-efficient op, plain math otherwise. flash-attn and Transformer Engine are
imported lazily, when asked for or when 'auto' looks for them on CUDA.
"""
from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from megalite.backends.blocked_attention import blocked_causal_attention, blocked_usable

BACKENDS = ("auto", "sdpa", "eager", "flash", "te")

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)
"""`scaled_dot_product_attention(..., enable_gqa=True)` exists from torch 2.5."""
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_EFFICIENT_LSE_ALIGN = 32
"""SDPA's memory-efficient CUDA op pads the sequence dimension of lse to a multiple of this, and reads it so."""


# ----------------------------------------------------------------------------------------------------------- checks
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"attention expects q [b, hq, s, d] and k, v [b, hkv, s, d] of equal shape; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.size(0) != k.size(0) or q.size(3) != k.size(3) or q.size(1) % k.size(1):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must share batch and head dim, and the number of query "
            "heads must be a multiple of the number of K/V heads"
        )
    if causal and q.size(2) != k.size(2):
        raise ValueError(f"causal attention needs equal query and key lengths, got {q.size(2)} and {k.size(2)}")


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.size(-1)) if scale is None else scale


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of lse, merging and gradient accumulation for inputs of `dtype`: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat each of the hkv heads of `x` [b, hkv, s, d] for its group of query heads: [b, num_q_heads, s, d]."""
    return x.repeat_interleave(num_q_heads // x.size(1), dim=1) if x.size(1) != num_q_heads else x


def sum_kv_grad(grad: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Inverse of `expand_kv` for gradients: sum [b, hq, s, d] over each group of query heads -> [b, hkv, s, d]."""
    if grad.size(1) == num_kv_heads:
        return grad
    return grad.unflatten(1, (num_kv_heads, grad.size(1) // num_kv_heads)).sum(2)


def _causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


# ------------------------------------------------------------------------------------------------------ eager math
def document_mask(documents_q: torch.Tensor, documents_k: torch.Tensor, causal: bool) -> torch.Tensor:
    """[b, 1, sq, sk] bool: query i may attend key j when both are in the same document (equal ids), and j <= i
    when `causal` (a diagonal block of equal-length q and k)."""
    mask = documents_q.unsqueeze(-1) == documents_k.unsqueeze(-2)
    if causal:
        mask = mask & _causal_mask(mask.size(-1), mask.device)
    return mask.unsqueeze(1)


def _eager_scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled scores in the accumulation dtype, masked with -inf above the diagonal when causal, and where `mask`
    (broadcast to [b, h, sq, sk]) is False."""
    acc = accumulation_dtype(q.dtype)
    s = (q.to(acc) @ expand_kv(k, q.size(1)).to(acc).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~_causal_mask(s.size(-1), s.device), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, dropout_p: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    probs = torch.softmax(_eager_scores(q, k, causal, scale, mask), dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ expand_kv(v, q.size(1)).to(probs.dtype)).to(q.dtype)


def _eager_forward_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row that `mask` leaves without any key gets out 0 and lse -inf (merging then ignores it)."""
    s = _eager_scores(q, k, causal, scale, mask)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1)) @ expand_kv(v, q.size(1)).to(s.dtype)
    return out.to(q.dtype), lse


def _eager_backward_with_lse(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(q.dtype)
    hq, hkv = q.size(1), k.size(1)
    do = dout.to(acc)
    probs = torch.exp(_eager_scores(q, k, causal, scale, mask) - lse.to(acc).unsqueeze(-1))
    dv = probs.transpose(-1, -2) @ do
    dprobs = do @ expand_kv(v, hq).to(acc).transpose(-1, -2)
    dscores = probs * (dprobs - (do * out.to(acc)).sum(-1, keepdim=True))
    dq = (dscores @ expand_kv(k, hq).to(acc)) * scale
    dk = (dscores.transpose(-1, -2) @ q.to(acc)) * scale
    return dq.to(q.dtype), sum_kv_grad(dk, hkv).to(k.dtype), sum_kv_grad(dv, hkv).to(v.dtype)


# -------------------------------------------------------------------------------------------- PyTorch fused kernels
def _cpu_flash_usable(q: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in _CPU_FLASH_DTYPES
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


def _cuda_flash_usable(q: torch.Tensor) -> bool:
    """SDPA's flash op: fp16/bf16, head dim a multiple of 8 up to 256, sm80 or newer; handles GQA natively."""
    return (
        q.is_cuda
        and q.dtype in _HALF_DTYPES
        and q.size(-1) % 8 == 0
        and q.size(-1) <= 256
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
    )


def _cuda_efficient_usable(q: torch.Tensor) -> bool:
    """SDPA's memory-efficient op: fp32/fp16/bf16 (GQA by expanding K/V)."""
    return q.is_cuda and q.dtype in (torch.float32, *_HALF_DTYPES)


def _empty_philox(q: torch.Tensor) -> torch.Tensor:
    """Random-number state of the fused CUDA ops; unused without dropout."""
    return torch.empty(0, dtype=torch.int64, device=q.device)


def attention_forward_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block and the log-sum-exp of its scaled scores: (out [b, hq, s, d], lse [b, hq, s]).

    No autograd graph is recorded. out has q's dtype, lse float32 (float64 for float64 inputs). With `mask`
    ([b, 1, sq, sk] bool, e.g. document boundaries) the block runs in plain math (no fused kernel takes a mask and
    returns lse); a row the mask leaves empty gets out 0 and lse -inf.
    """
    _check(q, k, v, causal)
    scale = _scale(q, scale)
    with torch.no_grad():
        if mask is not None:
            out, lse = _eager_forward_with_lse(q, k, v, causal, scale, mask)
        elif _cpu_flash_usable(q):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, scale=scale
            )
        elif _cuda_flash_usable(q):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
        elif _cuda_efficient_usable(q):
            hq = q.size(1)
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, expand_kv(k, hq), expand_kv(v, hq), None, True, 0.0, causal, scale=scale
            )[:2]
            lse = lse[..., : q.size(2)]  # drop the padding (see _EFFICIENT_LSE_ALIGN)
        else:
            out, lse = _eager_forward_with_lse(q, k, v, causal, scale)
    return out, lse.to(accumulation_dtype(q.dtype))


def attention_backward_with_lse(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, causal: bool, scale: float | None, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one block, given the final (merged) `out` and `lse` of the rows of `q`.

    `out`, `lse` and `dout` cover the same rows as `q`. dk and dv have hkv heads (summed over each query group).
    No autograd graph is recorded. `mask` as in `attention_forward_with_lse`.
    """
    _check(q, k, v, causal)
    scale = _scale(q, scale)
    out, dout = out.to(q.dtype), dout.to(q.dtype)
    with torch.no_grad():
        if mask is not None:
            return _eager_backward_with_lse(dout, q, k, v, out, lse, causal, scale, mask)
        if _cpu_flash_usable(q):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse.to(accumulation_dtype(q.dtype)), 0.0, causal, scale=scale
            )
        if _cuda_flash_usable(q):
            philox = _empty_philox(q)
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse.float().contiguous(), None, None, q.size(2), k.size(2), 0.0, causal,
                philox, philox, scale=scale,
            )
        if _cuda_efficient_usable(q):
            hq, hkv, philox = q.size(1), k.size(1), _empty_philox(q)
            padded_lse = F.pad(lse.float(), (0, -q.size(2) % _EFFICIENT_LSE_ALIGN))  # the kernel's own layout
            dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                dout, q, expand_kv(k, hq), expand_kv(v, hq), None, out, padded_lse, philox, philox,
                0.0, [True, True, True, False], causal, scale=scale,
            )
            return dq, sum_kv_grad(dk, hkv), sum_kv_grad(dv, hkv)
        return _eager_backward_with_lse(dout, q, k, v, out, lse, causal, scale)


# --------------------------------------------------------------------------------------------- public attention
@functools.lru_cache(maxsize=None)
def _flash_attn_func() -> Callable | None:
    """flash-attn's `flash_attn_func`, or None when the package is not importable."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=None)
def _te_pytorch() -> ModuleType | None:
    """`transformer_engine.pytorch`, or None when Transformer Engine is not importable."""
    try:
        import transformer_engine.pytorch as te
    except ImportError:
        return None
    return te


def _require_cuda_package(name: str, available: bool, q: torch.Tensor) -> None:
    if not (available and q.is_cuda):
        package = {"flash": "the flash-attn package", "te": "Transformer Engine"}[name]
        raise RuntimeError(
            f"attention backend {name!r} needs {package} and CUDA tensors (pip install megalite[gpu]); "
            "use --attention-backend sdpa or auto otherwise"
        )


def _flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, dropout_p: float
) -> torch.Tensor:
    # flash-attn works on [b, s, h, d] and handles grouped-query attention natively.
    out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                             softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _te_core(hq: int, hkv: int, head_dim: int, causal: bool, scale: float, dropout_p: float) -> torch.nn.Module:
    """Transformer Engine's `DotProductAttention` for one shape (it holds no parameters, so one is shared)."""
    return _te_pytorch().DotProductAttention(
        hq, head_dim, num_gqa_groups=hkv, attention_dropout=dropout_p, qkv_format="bshd",
        attn_mask_type="causal" if causal else "no_mask", softmax_scale=scale,
    )


def _te_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, dropout_p: float
) -> torch.Tensor:
    # TE takes [b, s, h, d] ("bshd"), handles grouped-query attention, and returns [b, s, h * d]. Its dropout draws
    # from the current CUDA generator, which the caller has forked to the model-parallel stream.
    b, hq, s, d = q.shape
    core = _te_core(hq, k.size(1), d, causal, scale, dropout_p)
    out = core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.view(b, s, hq, d).transpose(1, 2)


def _sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, dropout_p: float
) -> torch.Tensor:
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=k.size(1) != q.size(1)
        )
    hq = q.size(1)
    return F.scaled_dot_product_attention(
        q, expand_kv(k, hq), expand_kv(v, hq), dropout_p=dropout_p, is_causal=causal, scale=scale
    )


def resolve_backend(backend: str, q: torch.Tensor, blocked: bool = False) -> str:
    """The back-end that `backend` means for `q`: 'auto' is flash-attn, else Transformer Engine, on CUDA fp16/bf16
    when importable; 'blocked' (megalite/backends/blocked_attention.py) where the caller says its inputs suit it
    (`blocked`: CPU, fp32, causal, no dropout, short); sdpa otherwise (whose CUDA kernels are flash-attention
    kernels too)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in _HALF_DTYPES:
        if _flash_attn_func() is not None:
            return "flash"
        if _te_pytorch() is not None:
            return "te"
    return "blocked" if blocked else "sdpa"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None,
    dropout_p: float = 0.0, backend: str = "auto",
) -> torch.Tensor:
    """Differentiable attention softmax(q k^T * scale [causal]) v -> [b, hq, s, d] on the chosen back-end.

    Back-ends: 'eager' (plain math), 'sdpa' (torch's scaled_dot_product_attention), 'flash' (flash-attn, CUDA),
    'te' (Transformer Engine's DotProductAttention, CUDA), 'auto' (see `resolve_backend`). All take dropout.
    """
    _check(q, k, v, causal)
    scale = _scale(q, scale)
    name = resolve_backend(backend, q, blocked_usable(q, k, causal, dropout_p))
    if name == "blocked":
        return blocked_causal_attention(q, k, v, scale)
    if name == "eager":
        return _eager_attention(q, k, v, causal, scale, dropout_p)
    if name == "sdpa":
        return _sdpa_attention(q, k, v, causal, scale, dropout_p)
    if name == "flash":
        _require_cuda_package(name, _flash_attn_func() is not None, q)
        return _flash_attention(q, k, v, causal, scale, dropout_p)
    _require_cuda_package(name, _te_pytorch() is not None, q)
    return _te_attention(q, k, v, causal, scale, dropout_p)
