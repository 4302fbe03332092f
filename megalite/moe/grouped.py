"""Grouped experts: all local experts of an MoE layer as one autograd function, without per-expert modules.

The rows [M, in] are sorted by local expert (`counts[i]` rows for the i-th, possibly none); expert i's weight is
W_i [out, in]. Three formulations of the products (`GroupedMatmul`; `default_method` picks one per device):

- 'grouped_mm' (CUDA, wherever a probe finds both of its forms working and agreeing with `mm` for the dtype, with
  16-byte aligned widths; bf16 on sm90+ runs the CUTLASS kernel): torch's grouped GEMM `torch._grouped_mm`, one
  call for all experts ([M, in] x [E, in, out] with the group ends `offs`; [in, M] x [M, out] -> [E, in, out] for
  the weight gradients).
- 'blocked' (CPU): the whole MLP (fc1, activation, fc2; in backward the activation gradient, the input and the
  weight gradients) expert by expert inside this one autograd function, into whole [M, .] buffers, so that each
  expert's rows stay in cache from one product to the next. On CPU `torch._grouped_mm` works (forward and
  backward, torch >= 2.9) but is a C++ loop of the same MKL GEMMs, and a GEMM of an expert's ~100 rows already
  runs at the core's peak (~85 GFLOP/s fp32 on one thread, as a 1024^3 one does): measured against each other
  (`megalite bench moe`, interleaved), 'blocked' was 6-7% faster at 8 experts and level at 64 (its [E, out, in]
  weight-gradient outputs are fresh allocations the size of all the weights; 'blocked' allocates per expert).
- 'bmm' (other devices without a working grouped GEMM: one kernel instead of E launches): rows scattered into a
  zero-padded [E, max rows, in] batch and `torch.bmm` (padding rows add nothing to the weight gradients); on CPU
  15-40% slower than the others (the padding and the scatter/gather).

`stack_weights` returns the experts' weights as one [E, out, in] tensor: a strided view when the per-expert
parameters lie at a uniform stride in one storage (`LocalExperts` packs them so), else a copy.

`grouped_mlp` is the expert MLP (fc1 -> SwiGLU or GeLU -> fc2) of all experts: forward saves the rows, fc1's output
and the activation; backward computes the input gradient at once and the weight gradients at once or, while the
model context defers weight gradients (zero-bubble schedules), as work queued for the W pass, exactly as the
`linear` of megalite/tensor_parallel/layers.py does.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from megalite.context import GradSink, ModelContext


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs both forms (2D x 3D, 2D x 2D) on this device and dtype and agrees with mm
    on a tiny case with an empty group."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(6, 16, generator=g), torch.randn(3, 16, 8, generator=g)
        counts = [2, 0, 4]
        x, w = x.to(device_type, dtype), w.to(device_type, dtype)
        offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=device_type)
        y = torch._grouped_mm(x, w, offs=offs)
        dw = torch._grouped_mm(x.t(), y, offs=offs)
        ref_y = torch.cat([a @ b for a, b in zip(x.split(counts), w)])
        ref_dw = torch.stack([a.t() @ b for a, b in zip(x.split(counts), ref_y.split(counts))])
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        return bool(torch.allclose(y, ref_y, rtol=tol, atol=tol) and torch.allclose(dw, ref_dw, rtol=tol, atol=tol))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


METHODS = ("blocked", "grouped_mm", "bmm")


def default_method(device: torch.device, dtype: torch.dtype, aligned: bool) -> str:
    """'blocked' on CPU; elsewhere 'grouped_mm' where torch's grouped GEMM works and the widths are aligned, else
    'bmm' (see the module docstring)."""
    if device.type == "cpu":
        return "blocked"
    return "grouped_mm" if aligned and grouped_mm_works(device.type, dtype) else "bmm"


class GroupedMatmul:
    """Products of rows grouped by expert with one matrix per expert, for fixed group sizes `counts`."""

    def __init__(self, counts: list[int], device: torch.device, dtype: torch.dtype, widths: tuple[int, ...],
                 method: str | None = None):
        """`widths`: every row width the products will see (aligned widths allow the grouped GEMM); `method`
        forces one of `METHODS` (tests, benchmarks)."""
        self.counts, self.rows = counts, sum(counts)
        aligned = all(w * torch.empty((), dtype=dtype).element_size() % 16 == 0 for w in widths)
        if method is None:
            method = default_method(device, dtype, aligned)
        if method not in METHODS or (method == "grouped_mm" and not aligned):
            raise ValueError(f"grouped expert method {method!r} is unknown or needs 16-byte aligned widths {widths}")
        self.method = method
        ends = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        if method == "grouped_mm":
            self.offs = ends.to(device=device, dtype=torch.int32)
        elif method == "bmm":  # row r of expert e sits at e x cap + (r - first row of e) of the padded batch
            self.cap = max(counts, default=0)
            starts = ends - torch.tensor(counts, dtype=torch.int64)
            expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
            self.slots = (expert * self.cap + torch.arange(self.rows) - starts[expert]).to(device)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(len(self.counts) * self.cap, x.shape[1])
        padded[self.slots] = x
        return padded.view(len(self.counts), self.cap, x.shape[1])

    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [M, k] times w [E, k, n] per group -> [M, n] ('grouped_mm', 'bmm'; 'blocked' runs its own loop)."""
        if self.method == "grouped_mm":
            return torch._grouped_mm(x, w, offs=self.offs)
        return torch.bmm(self._pad(x), w).view(-1, w.shape[-1])[self.slots]

    def weight_grad(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [M, k], b [M, n] -> [E, k, n]: a_e^T b_e per group (zero for empty groups)."""
        if self.method == "grouped_mm":
            return torch._grouped_mm(a.t(), b, offs=self.offs)
        if self.method == "blocked":
            out = a.new_zeros(len(self.counts), a.shape[1], b.shape[1])
            for ae, be, oe in zip(a.split(self.counts), b.split(self.counts), out.unbind(0)):
                if ae.shape[0]:
                    torch.mm(ae.t(), be, out=oe)
            return out
        return torch.bmm(self._pad(a).transpose(1, 2), self._pad(b))


def stack_weights(weights: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """The weights [out, in] as one [E, out, in] tensor: a view when they lie at a uniform stride in one storage."""
    first = weights[0]
    if len(weights) == 1:
        return first.unsqueeze(0)
    if first.is_contiguous():
        step = weights[1].storage_offset() - first.storage_offset()
        base = first.untyped_storage().data_ptr()
        if step >= first.numel() and all(
                w.is_contiguous() and w.dtype == first.dtype and w.shape == first.shape
                and w.untyped_storage().data_ptr() == base
                and w.storage_offset() == first.storage_offset() + i * step for i, w in enumerate(weights)):
            return first.as_strided((len(weights), *first.shape), (step, *first.stride()))
    return torch.stack(list(weights))


def _activation(h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def _activation_backward(grad: torch.Tensor, h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """d loss / d h from d loss / d activation(h)."""
    if not swiglu:
        return torch.ops.aten.gelu_backward(grad, h)
    gate, up = h.chunk(2, dim=-1)
    out = torch.empty_like(h)
    d_gate, d_up = out.chunk(2, dim=-1)
    torch.mul(grad, F.silu(gate), out=d_up)
    d_gate.copy_(torch.ops.aten.silu_backward(grad * up, gate))
    return out


def _blocked_forward(plan: GroupedMatmul, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, swiglu: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fc1, activation and fc2 expert by expert into whole [M, .] buffers, so that each expert's rows stay in cache
    from one product to the next. Returns fc1's output h, silu(gate) (SwiGLU; else h), the activation, the output."""
    h = x.new_empty(x.shape[0], w1.shape[1])
    a = x.new_empty(x.shape[0], w2.shape[2])
    s = x.new_empty(a.shape) if swiglu else h
    y = x.new_empty(x.shape[0], w2.shape[1])
    for e, (xe, he, se, ae, ye) in enumerate(zip(*(t.split(plan.counts) for t in (x, h, s, a, y)))):
        if xe.shape[0]:
            torch.mm(xe, w1[e].t(), out=he)
            if swiglu:
                gate, up = he.chunk(2, dim=-1)
                torch.mul(torch.ops.aten.silu.out(gate, out=se), up, out=ae)
            else:
                torch.ops.aten.gelu.out(he, out=ae)
            torch.mm(ae, w2[e].t(), out=ye)
    return h, s, a, y


def _blocked_backward(plan: GroupedMatmul, grad: torch.Tensor, x: torch.Tensor, h: torch.Tensor, s: torch.Tensor,
                      a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, swiglu: bool, weights: bool,
                      params: tuple[torch.nn.Parameter, ...] = (), sink: GradSink | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Expert by expert: the input gradient, fc1's output gradient and (`weights`) the weight gradients, fc1's
    then fc2's (zeros for experts without rows). With a gradient `sink` (fp32), a weight gradient goes straight into
    its parameter's main gradient (its entry None) wherever the sink takes it."""
    dx, dh = torch.empty_like(x), torch.empty_like(h)
    dw1, dw2 = [], []
    num = len(plan.counts)

    def weight_grad(index: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor | None:
        """left^T right for parameter `index`, or None where the sink accumulated it in place."""
        if sink is not None and sink(params[index], lambda main: main.addmm_(left.t(), right)):
            return None
        return left.t().mm(right)

    for e, (ge, xe, he, se, ae, dxe, dhe) in enumerate(zip(*(t.split(plan.counts)
                                                            for t in (grad, x, h, s, a, dx, dh)))):
        if not ge.shape[0]:
            if weights:
                dw1.append(weight_grad(e, dhe, xe))  # zeros (or nothing added), but a contribution all the same
                dw2.append(weight_grad(num + e, ge, ae))
            continue
        da = ge.mm(w2[e])
        if swiglu:
            gate, up = he.chunk(2, dim=-1)
            d_gate, d_up = dhe.chunk(2, dim=-1)
            torch.mul(da, se, out=d_up)
            torch.ops.aten.silu_backward.grad_input(da.mul_(up), gate, grad_input=d_gate)
        else:
            torch.ops.aten.gelu_backward.grad_input(da, he, grad_input=dhe)
        torch.mm(dhe, w1[e], out=dxe)
        if weights:
            dw1.append(weight_grad(e, dhe, xe))
            dw2.append(weight_grad(num + e, ge, ae))
    return dx, dh, dw1 + dw2


class _GroupedMLPFunction(torch.autograd.Function):
    """fc2(act(fc1(x))) per expert group; inputs x, the plan, swiglu, the context, then E fc1 and E fc2 weights."""

    @staticmethod
    def forward(ctx, x, plan, swiglu, context, *weights):
        num = len(weights) // 2
        ctx.plan, ctx.swiglu, ctx.context, ctx.params = plan, swiglu, context, weights
        w1, w2 = stack_weights(weights[:num]), stack_weights(weights[num:])
        if plan.method == "blocked":
            h, s, a, y = _blocked_forward(plan, x, w1, w2, swiglu)
            ctx.save_for_backward(x, h, s, a)
            return y
        h = plan.mm(x, w1.transpose(1, 2))
        a = _activation(h, swiglu)
        ctx.save_for_backward(x, h, a, a)
        return plan.mm(a, w2.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, h, s, a = ctx.saved_tensors
        plan, params = ctx.plan, ctx.params
        num = len(params) // 2
        grad = grad.contiguous()
        w1, w2 = stack_weights(params[:num]), stack_weights(params[num:])
        queue = ctx.context.weight_grad_queue
        wanted = params[0].requires_grad
        grads = None
        if plan.method == "blocked":
            sink = ctx.context.grad_sink if grad.dtype == torch.float32 else None
            dx, dh, grads = _blocked_backward(plan, grad, x, h, s, a, w1, w2, ctx.swiglu, wanted and queue is None,
                                              params, sink)
        else:
            dh = _activation_backward(plan.mm(grad, w2), h, ctx.swiglu)
            dx = plan.mm(dh, w1)
        nothing = (None,) * len(params)
        if not wanted:
            return dx, None, None, None, *nothing

        def weight_grads() -> list[torch.Tensor]:
            return [*plan.weight_grad(dh, x).unbind(0), *plan.weight_grad(grad, a).unbind(0)]

        if queue is None:
            return dx, None, None, None, *(grads if grads is not None else weight_grads())

        @torch.no_grad()
        def deferred() -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
            return list(zip(params, weight_grads()))

        queue.append(deferred)
        return dx, None, None, None, *nothing


def grouped_mlp(x: torch.Tensor, counts: list[int], fc1: list[torch.Tensor], fc2: list[torch.Tensor], swiglu: bool,
                context: ModelContext, method: str | None = None) -> torch.Tensor:
    """Rows x [M, h] sorted by expert (`counts` per expert) through each expert's fc1 [2f or f, h] -> SwiGLU or GeLU
    -> fc2 [h, f]; -> [M, h]. Without autograd, the same products without saving anything."""
    x = x.contiguous()
    plan = GroupedMatmul(counts, x.device, x.dtype, (x.shape[1], fc1[0].shape[0], fc2[0].shape[1]), method)
    if not torch.is_grad_enabled():
        w1, w2 = stack_weights(fc1), stack_weights(fc2)
        if plan.method == "blocked":
            return _blocked_forward(plan, x, w1, w2, swiglu)[3]
        return plan.mm(_activation(plan.mm(x, w1.transpose(1, 2)), swiglu), w2.transpose(1, 2))
    return _GroupedMLPFunction.apply(x, plan, swiglu, context, *fc1, *fc2)
