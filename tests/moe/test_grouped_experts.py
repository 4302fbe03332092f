"""The grouped experts (every formulation: 'blocked', 'grouped_mm', 'bmm') equal the per-expert loop they replace:
outputs, input gradients and weight gradients in fp32 to 1e-6 relative error, with experts that get no rows, with
GeLU and SwiGLU, on ETP shards (2 gloo ranks, ETP = 2), and with the weight gradients deferred to a W pass (the
zero-bubble schedules' split backward). Also: the packed weights are views (no stacking copy), and survive a dtype
conversion."""
import pytest
import torch

from megalite import parallel_state as ps
from megalite.config import ModelConfig
from megalite.context import ModelContext, ParallelKnobs
from megalite.moe.experts import LocalExperts
from megalite.moe.grouped import METHODS, stack_weights
from megalite.tensor_parallel import initialize_parameters
from megalite.testing import run_distributed

H, FFN, E = 16, 8, 6
COUNTS = [5, 0, 3, 0, 9, 2]  # experts 1 and 3 get no rows


def make_experts(swiglu: bool, etp: int = 1) -> tuple[LocalExperts, ModelContext, ps.ProcessGroups]:
    groups = ps.initialize_model_parallel(etp=etp)
    cfg = ModelConfig(num_layers=2, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=4, num_experts=E,
                      moe_ffn_hidden_size=FFN, moe_router_topk=2, swiglu=swiglu)
    context = ModelContext(ParallelKnobs())
    experts = LocalExperts(cfg, groups, context, FFN, 0.02)
    initialize_parameters(list(experts.named_parameters()), 7)
    return experts, context, groups


@pytest.fixture
def experts_of():
    """make_experts, its process groups destroyed after the test."""
    made = []

    def make(swiglu: bool) -> tuple[LocalExperts, ModelContext]:
        made.append(make_experts(swiglu))
        return made[-1][:2]

    yield make
    for _, _, groups in made:
        ps.destroy_model_parallel(groups)


def run(experts: LocalExperts, method: str | None, defer: bool = False, context: ModelContext | None = None) -> dict:
    """Forward/backward of fixed rows; grouped with `method`, or the loop when `method` is 'loop'."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(COUNTS), H, generator=g).requires_grad_()
    dy = torch.randn(sum(COUNTS), H, generator=g)
    experts.grouped, experts.method = method != "loop", None if method == "loop" else method
    for p in experts.parameters():
        p.grad = None
    if defer:
        with context.deferring_weight_grads() as queue:
            y = experts(x, COUNTS)
            y.backward(dy)
        assert queue and all(p.grad is None for p in experts.parameters())
        deferred = {id(p): grad for work in queue for p, grad in work()}
        grads = {name: deferred[id(p)] for name, p in experts.named_parameters()}
    else:
        y = experts(x, COUNTS)
        y.backward(dy)
        grads = {name: p.grad for name, p in experts.named_parameters()}
    return dict(y=y.detach(), dx=x.grad, grads=grads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same(got: dict, ref: dict, tol: float = 1e-6) -> None:
    assert _rel(got["y"], ref["y"]) < tol and _rel(got["dx"], ref["dx"]) < tol
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in got["grads"].items():
        if ref["grads"][name].abs().sum() == 0:  # an expert without rows: exactly zero
            assert g.abs().sum() == 0, name
        else:
            assert _rel(g, ref["grads"][name]) < tol, name


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
@pytest.mark.parametrize("method", METHODS)
def test_grouped_equals_the_loop(method, swiglu, world_of_one, experts_of):
    experts, _ = experts_of(swiglu)
    ref = run(experts, "loop")
    assert ref["grads"]["1.fc1.weight"].abs().sum() == 0  # the empty experts are in the case
    assert_same(run(experts, method), ref)
    with torch.no_grad():  # generation's path: no autograd, same products
        experts.grouped, experts.method = True, method
        x = torch.randn(sum(COUNTS), H)
        y = experts(x, COUNTS)
        experts.grouped = False
        assert _rel(y, experts(x, COUNTS)) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_deferred_weight_gradients_equal_the_loop(method, world_of_one, experts_of):
    experts, context = experts_of(True)
    ref = run(experts, "loop", defer=True, context=context)
    assert_same(run(experts, method, defer=True, context=context), ref)
    assert_same(run(experts, method), ref)


def test_weights_are_packed_views_and_stay_packed_after_conversion(world_of_one, experts_of):
    experts, _ = experts_of(True)
    fc1 = experts.weights("fc1")
    stacked = stack_weights(fc1)
    assert stacked.data_ptr() == fc1[0].data_ptr() and torch.equal(stacked, torch.stack(fc1))
    experts.to(torch.float64)
    fc1 = experts.weights("fc1")
    assert fc1[0].dtype == torch.float64 and stack_weights(fc1).data_ptr() == fc1[0].data_ptr()
    assert torch.equal(stack_weights(fc1[::2]), torch.stack(fc1[::2]))  # every other one: a view too
    shuffled = [fc1[0], fc1[2], fc1[1]]  # not at a uniform stride: a copy, still right
    assert stack_weights(shuffled).data_ptr() != fc1[0].data_ptr()
    assert torch.equal(stack_weights(shuffled), torch.stack(shuffled))


def _etp_cases() -> list[tuple[dict, dict]]:
    """On each ETP rank (its shard of every expert: fc1's [gate; up] rows, fc2's columns): (loop, each method)."""
    experts, _, groups = make_experts(True, etp=2)
    assert experts["0"].fc1.weight.shape == (FFN, H)  # half of [2 x FFN, H]
    out = [(run(experts, "loop"), run(experts, m)) for m in METHODS]
    ps.destroy_model_parallel(groups)
    return out


def test_grouped_equals_the_loop_on_etp_shards(world_of_one):
    for rank in run_distributed(2, _etp_cases):
        for ref, got in rank:
            assert_same(got, ref)
