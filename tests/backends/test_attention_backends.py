"""megalite.backends.attention: every back-end and the log-sum-exp block forms against a float64 reference."""
import math

import pytest
import torch

from megalite.backends import attention as A

HEADS = [(4, 4), (4, 2), (4, 1)]  # (query heads, K/V heads): MHA, GQA, MQA


def reference(q, k, v, causal, scale):
    """Plain float64 attention with explicit head grouping: (out, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.size(1) // k.size(1)
    owner = torch.arange(q.size(1), device=q.device) // group  # K/V head read by each query head
    scores = q @ k[:, owner].transpose(-1, -2) * scale
    if causal:
        above = torch.arange(k.size(2), device=q.device)[None, :] > torch.arange(q.size(2), device=q.device)[:, None]
        scores = scores.masked_fill(above, -math.inf)
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ v[:, owner], lse


def reference_grads(q, k, v, dout, causal, scale):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, _ = reference(*leaves, causal, scale)
    out.backward(dout.double())
    return [t.grad for t in leaves]


def inputs(hq, hkv, sq=12, sk=12, b=2, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_attention_and_its_gradients_match_float64_reference(backend, causal, hq, hkv):
    q, k, v, dout = inputs(hq, hkv)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = A.attention(*leaves, causal=causal, scale=0.3, backend=backend)
    out.backward(dout)
    ref_out, _ = reference(q, k, v, causal, 0.3)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert rel_err(out, ref_out) < 1e-6
    for got, want in zip(leaves, reference_grads(q, k, v, dout, causal, 0.3)):
        assert got.grad.shape == want.shape and rel_err(got.grad, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_blocked_causal_attention_over_several_blocks_matches_float64_reference(dtype, hq, hkv):
    """70 rows: blocks of 32, 32 and 6; permuted views of a sequence-first layout, as the model passes them."""
    from megalite.backends.blocked_attention import BLOCK, blocked_causal_attention

    s = 2 * BLOCK + 6
    q, k, v, dout = inputs(hq, hkv, sq=s, sk=s, dtype=dtype)
    leaves = [t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_() for t in (q, k, v)]
    out = blocked_causal_attention(*leaves, scale=0.3)
    out.backward(dout)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert out.dtype == dtype and rel_err(out, reference(q, k, v, True, 0.3)[0]) < tol
    for got, want in zip(leaves, reference_grads(q, k, v, dout, True, 0.3)):
        assert got.grad.shape == want.shape and rel_err(got.grad, want) < 10 * tol


@pytest.mark.parametrize("hkv", [2, 1])
def test_blocked_causal_attention_is_bitwise_equal_under_head_and_batch_splits(hkv):
    """What a TP rank (half the query heads, their K/V heads) or a DP rank (half the batch) computes equals the
    whole computation's slice exactly, forward and backward, as with SDPA's per-head kernel."""
    from megalite.backends.blocked_attention import blocked_causal_attention

    q, k, v, dout = inputs(4, hkv, sq=70, sk=70, b=4)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    out = blocked_causal_attention(*whole, scale=0.3)
    out.backward(dout)
    for rows in (slice(0, 2), slice(2, 4)):
        for heads in (slice(0, 2), slice(2, 4)):
            kv = slice(heads.start * hkv // 4, max(heads.stop * hkv // 4, heads.start * hkv // 4 + 1))
            part = [t[rows, h].clone().requires_grad_() for t, h in zip((q, k, v), (heads, kv, kv))]
            part_out = blocked_causal_attention(*part, scale=0.3)
            part_out.backward(dout[rows, heads])
            assert torch.equal(part_out, out[rows, heads]) and torch.equal(part[0].grad, whole[0].grad[rows, heads])
            if hkv == 2:  # each TP rank's K/V heads are its own: their gradients compare too
                assert torch.equal(part[1].grad, whole[1].grad[rows, kv])


def test_auto_takes_the_blocked_kernel_only_for_short_causal_fp32_cpu_attention_without_dropout(monkeypatch):
    from megalite.backends import blocked_attention as B

    calls = []
    monkeypatch.setattr(A, "blocked_causal_attention", lambda *args: calls.append(args) or args[0])
    q, k, v, _ = inputs(4, 2)
    A.attention(q, k, v, causal=True)
    assert len(calls) == 1
    A.attention(q, k, v, causal=False)
    A.attention(q, k, v, causal=True, dropout_p=0.5)
    A.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    A.attention(q, k, v, causal=True, backend="sdpa")
    monkeypatch.setattr(B, "MAX_SCORES", q.numel() // q.size(-1) * q.size(2) - 1)
    A.attention(q, k, v, causal=True)
    assert len(calls) == 1


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = inputs(4, 2, d=16)
    want, _ = reference(q, k, v, True, 0.25)
    assert rel_err(A.attention(q, k, v, backend="eager"), want) < 1e-6
    assert rel_err(A.attention_forward_with_lse(q, k, v, causal=True, scale=None)[0], want) < 1e-6


@pytest.mark.parametrize("forward", [A.attention_forward_with_lse, A._eager_forward_with_lse],
                         ids=["cpu_flash", "eager"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_forward_with_lse_matches_reference(forward, causal, hq, hkv):
    q, k, v, _ = inputs(hq, hkv, sq=10, sk=10 if causal else 14)
    if forward is A.attention_forward_with_lse:
        assert A._cpu_flash_usable(q)
        out, lse = forward(q, k, v, causal=causal, scale=0.3)
    else:
        out, lse = forward(q, k, v, causal, 0.3)
    ref_out, ref_lse = reference(q, k, v, causal, 0.3)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert rel_err(out, ref_out) < 1e-6 and rel_err(lse, ref_lse) < 1e-6


@pytest.mark.parametrize("backward", [A.attention_backward_with_lse, A._eager_backward_with_lse],
                         ids=["cpu_flash", "eager"])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_backward_with_final_lse_sums_over_key_blocks_to_full_gradients(backward, hq, hkv):
    """Split the keys of a causal row block into a causal diagonal and a full prefix: the blocks' gradients,
    each computed from the FINAL out and lse, add up to the gradients of the whole attention."""
    q, k, v, dout = inputs(hq, hkv, sq=16, sk=16)
    ref_out, ref_lse = reference(q, k, v, True, 0.3)
    out, lse = ref_out.float(), ref_lse.float()
    rows, prefix, diag = slice(8, 16), slice(0, 8), slice(8, 16)

    def grads(r, c, causal):
        args = (dout[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r], lse[:, :, r])
        if backward is A.attention_backward_with_lse:
            return backward(*args, causal=causal, scale=0.3)
        return backward(*args, causal, 0.3)

    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for r, c, causal in [(prefix, prefix, True), (rows, prefix, False), (rows, diag, True)]:
        bq, bk, bv = grads(r, c, causal)
        assert bk.shape[1] == hkv and bv.shape[1] == hkv
        dq[:, :, r] += bq
        dk[:, :, c] += bk
        dv[:, :, c] += bv
    for got, want in zip((dq, dk, dv), reference_grads(q, k, v, dout, True, 0.3)):
        assert rel_err(got, want) < 1e-5


def test_with_lse_forms_accept_permuted_views_of_a_sequence_first_layout():
    """The model holds [s, b, h, d] activations and hands attention permuted (non-contiguous) views."""
    q, k, v, dout = (t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for t in inputs(4, 2))
    assert not q.is_contiguous()
    out, lse = A.attention_forward_with_lse(q, k, v, causal=True, scale=0.3)
    assert rel_err(out, reference(q, k, v, True, 0.3)[0]) < 1e-6
    grads = A.attention_backward_with_lse(dout, q, k, v, out, lse, causal=True, scale=0.3)
    for got, want in zip(grads, reference_grads(q, k, v, dout, True, 0.3)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_lse_is_at_least_float32_and_out_keeps_the_input_dtype(dtype):
    q, k, v, dout = inputs(4, 2, dtype=dtype)
    out, lse = A.attention_forward_with_lse(q, k, v, causal=True, scale=0.3)
    ref_out, ref_lse = reference(q, k, v, True, 0.3)
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-12
    assert rel_err(out, ref_out) < tol and rel_err(lse, ref_lse) < tol
    dq, dk, dv = A.attention_backward_with_lse(dout, q, k, v, out, lse, causal=True, scale=0.3)
    for got, want in zip((dq, dk, dv), reference_grads(q, k, v, dout, True, 0.3)):
        assert got.dtype == dtype and rel_err(got, want) < 5 * tol


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dropout_zeroes_probabilities_and_keeps_the_expectation(backend):
    torch.manual_seed(0)
    q, k, _, _ = inputs(2, 2, sq=64, sk=64, b=4)
    ones = torch.ones_like(k)  # each output element is then the sum of the row's kept, rescaled probabilities
    out = A.attention(q, k, ones, causal=False, dropout_p=0.5, backend=backend)
    assert 0.97 < out.mean().item() < 1.03
    assert out.std().item() > 0.05
    torch.testing.assert_close(A.attention(q, k, ones, causal=False, backend=backend), torch.ones_like(out))


def test_bad_inputs_and_unavailable_backends_fail_clearly():
    q, k, v, _ = inputs(4, 2)
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="multiple of the number of K/V heads"):
        A.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        A.attention_forward_with_lse(q[:, :, :5], k, v, causal=True, scale=None)
    if A._flash_attn_func() is None:
        with pytest.raises(RuntimeError, match="flash-attn package and CUDA"):
            A.attention(q, k, v, backend="flash")
    if A._te_pytorch() is None:
        with pytest.raises(RuntimeError, match="Transformer Engine and CUDA"):
            A.attention(q, k, v, backend="te")
    assert A.resolve_backend("auto", q) == "sdpa" and A.resolve_backend("auto", q, blocked=True) == "blocked"


# ------------------------------------------------- flash-attn and Transformer Engine adapters, with stand-ins
def _grouped_bshd_attention(q, k, v, causal, scale):
    """The documented contract of both packages on [b, s, h, d] inputs, in plain math (through `reference`)."""
    out, _ = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale)
    return out.to(q.dtype).transpose(1, 2)


def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    assert q.shape[1] == k.shape[1] and q.shape[2] % k.shape[2] == 0, "flash-attn takes [b, s, h, d]"
    assert dropout_p == 0.0
    return _grouped_bshd_attention(q, k, v, causal, softmax_scale)


class FakeDotProductAttention(torch.nn.Module):
    """Stand-in for transformer_engine.pytorch.DotProductAttention: checks the arguments megalite passes."""

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", softmax_scale=None):
        super().__init__()
        assert qkv_format == "bshd" and attn_mask_type in ("causal", "no_mask") and attention_dropout == 0.0
        self.heads, self.head_dim, self.groups = num_attention_heads, kv_channels, num_gqa_groups
        self.causal, self.scale = attn_mask_type == "causal", softmax_scale

    def forward(self, q, k, v):
        b, s = q.shape[:2]
        assert q.shape[2:] == (self.heads, self.head_dim) and k.shape[2] == self.groups
        return _grouped_bshd_attention(q, k, v, self.causal, self.scale).reshape(b, s, -1)


@pytest.mark.parametrize("adapter", ["flash", "te"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_package_adapters_pass_layouts_heads_and_mask_as_documented(monkeypatch, adapter, causal, hq, hkv):
    import types

    monkeypatch.setattr(A, "_flash_attn_func", lambda: fake_flash_attn_func)
    monkeypatch.setattr(A, "_te_pytorch", lambda: types.SimpleNamespace(DotProductAttention=FakeDotProductAttention))
    A._te_core.cache_clear()
    try:
        q, k, v, dout = inputs(hq, hkv)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        run = A._flash_attention if adapter == "flash" else A._te_attention
        out = run(*leaves, causal, 0.3, 0.0)
        out.backward(dout)
    finally:
        A._te_core.cache_clear()
    ref_out, _ = reference(q, k, v, causal, 0.3)
    assert out.shape == q.shape and rel_err(out, ref_out) < 1e-6
    for got, want in zip(leaves, reference_grads(q, k, v, dout, causal, 0.3)):
        assert rel_err(got.grad, want) < 1e-5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # memory-efficient op, flash op
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_cuda_forward_and_backward_with_lse_match_reference(dtype, causal, hq, hkv):
    q, k, v, dout = (t.cuda() for t in inputs(hq, hkv, sq=100, sk=100, d=32, dtype=dtype))
    out, lse = A.attention_forward_with_lse(q, k, v, causal=causal, scale=0.3)
    ref_out, ref_lse = reference(q, k, v, causal, 0.3)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert rel_err(out, ref_out) < tol and rel_err(lse, ref_lse) < tol
    grads = A.attention_backward_with_lse(dout, q, k, v, out, lse, causal=causal, scale=0.3)
    for got, want in zip(grads, reference_grads(q, k, v, dout, causal, 0.3)):
        assert got.shape == want.shape and rel_err(got, want) < 2 * tol


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_cuda_blocks_of_sliced_views_merge_to_full_attention(dtype, hq, hkv):
    """Ring attention's use: row/key slices of larger tensors, blocks merged by lse, gradients from the final lse."""
    q, k, v, dout = (t.cuda() for t in inputs(hq, hkv, sq=48, sk=48, d=64, dtype=dtype))
    rows, prefix, diag = slice(24, 48), slice(0, 24), slice(24, 48)
    blocks = [(prefix, prefix, True), (rows, prefix, False), (rows, diag, True)]
    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full(q.shape[:-1], -math.inf, device="cuda")
    for r, c, causal in blocks:
        o, l = A.attention_forward_with_lse(q[:, :, r], k[:, :, c], v[:, :, c], causal=causal, scale=0.3)
        new = torch.logaddexp(lse[:, :, r], l)
        out[:, :, r] = out[:, :, r] * (lse[:, :, r] - new).exp()[..., None] + o.float() * (l - new).exp()[..., None]
        lse[:, :, r] = new
    ref_out, ref_lse = reference(q, k, v, True, 0.3)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(out, ref_out) < tol and rel_err(lse, ref_lse) < tol
    out = out.to(dtype)
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
    for r, c, causal in blocks:
        bq, bk, bv = A.attention_backward_with_lse(dout[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r],
                                                   lse[:, :, r], causal=causal, scale=0.3)
        dq[:, :, r] += bq
        dk[:, :, c] += bk
        dv[:, :, c] += bv
    for got, want in zip((dq, dk, dv), reference_grads(q, k, v, dout, True, 0.3)):
        assert rel_err(got, want) < 2 * tol


@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "eager", "auto"])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_cuda_attention_matches_reference(backend, hq, hkv):
    q, k, v, dout = (t.cuda() for t in inputs(hq, hkv, sq=40, sk=40, d=32))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = A.attention(*leaves, causal=True, scale=0.3, backend=backend)
    out.backward(dout)
    assert rel_err(out, reference(q, k, v, True, 0.3)[0]) < 1e-5
    for got, want in zip(leaves, reference_grads(q, k, v, dout, True, 0.3)):
        assert rel_err(got.grad, want) < 1e-5
