"""megalite.backends.norms: RMSNorm against PyTorch's, its gradients, and what it keeps for backward."""
import pytest
import torch
import torch.nn.functional as F

from megalite.backends.norms import RMSNorm


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_matches_torch_forward_and_backward(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(5, 3, 16, generator=g, dtype=torch.float64)).to(dtype)
    w = torch.randn(16, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(5, 3, 16, generator=g, dtype=torch.float64).to(dtype)
    norm = RMSNorm(16, 1e-5).to(dtype)
    norm.weight.data.copy_(w)
    xa = x.clone().requires_grad_()
    norm(xa).backward(grad)
    xb, wb = x.double().requires_grad_(), w.double().requires_grad_()
    want = F.rms_norm(xb, (16,), wb, 1e-5)
    want.backward(grad.double())
    torch.testing.assert_close(norm(x).double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(norm.weight.grad.double(), wb.grad, rtol=tol, atol=tol * 10)


def test_rms_norm_passes_gradcheck():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(8, 1e-6).double()
    norm.weight.data.uniform_(0.5, 1.5)
    assert torch.autograd.gradcheck(lambda x, w: torch.nn.functional.linear(norm(x), torch.eye(8, dtype=x.dtype)) * w,
                                    (x, torch.ones(8, dtype=torch.float64, requires_grad=True)))


def test_rms_norm_keeps_its_bf16_input_and_one_float32_per_token():
    tokens, hidden = 64, 128
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    norm = RMSNorm(hidden, 1e-5).to(torch.bfloat16)
    _, seen = _saved_bytes(lambda: norm(x))
    seen.pop(norm.weight.untyped_storage().data_ptr())
    assert sorted(seen.values()) == [4 * tokens, 2 * tokens * hidden]
