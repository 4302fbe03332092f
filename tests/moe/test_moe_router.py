"""The router on one process: score normalisation, capacity dropping against a direct Python reference, expert bias
(selection only, update direction, checkpointed), aux losses reaching the gradient with the set scale, and
build_mlp's interleaving of dense and MoE layers."""
import math

import pytest
import torch
from megalite.config import ModelConfig
from megalite.context import ModelContext
from megalite.models.gpt import build_mlp, recompute
from megalite.models.mlp import MLP
from megalite.moe import MoELayer, TopKRouter, update_expert_biases
from megalite.moe.router import capacity_keep, expert_capacity, topk_routing
from megalite.tensor_parallel import initialize_parameters

E, K, H = 8, 2, 16


def config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=H, ffn_hidden_size=8, num_experts=E, moe_router_topk=K, swiglu=True)
    return ModelConfig(**(base | overrides))


def logits(tokens: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, E, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("pre", [True, False])
def test_weights_are_the_chosen_scores_normalised_before_or_after_topk(score_function, pre):
    z = logits()
    scores = torch.softmax(z, -1) if score_function == "softmax" else torch.sigmoid(z)
    weights, indices = topk_routing(z, K, score_function, pre)
    assert torch.equal(indices, scores.topk(K, -1).indices)
    chosen = scores.gather(1, indices)
    torch.testing.assert_close(weights, chosen if pre else chosen / chosen.sum(-1, keepdim=True))
    if score_function == "softmax" and not pre:  # Megatron's form: softmax over the k chosen logits
        torch.testing.assert_close(weights, torch.softmax(z.gather(1, indices), -1))


def _python_capacity_keep(indices, weights, capacity, policy):
    """Per expert: its pairs ordered by (-weight, position) or position; the first `capacity` stay."""
    tokens, k = indices.shape
    keep = [[False] * k for _ in range(tokens)]
    for e in range(E):
        pairs = [(t, j) for t in range(tokens) for j in range(k) if indices[t, j] == e]
        if policy == "probs":
            pairs.sort(key=lambda p: (-weights[p[0], p[1]].item(), p[0] * k + p[1]))
        for t, j in pairs[:capacity]:
            keep[t][j] = True
    return torch.tensor(keep)


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.3])
def test_capacity_drop_matches_python_reference(policy, factor):
    z = logits(tokens=40, seed=1) * 2
    weights, indices = topk_routing(z, K, "softmax", False)
    capacity = expert_capacity(40, K, E, factor)
    assert capacity == math.ceil(factor * 40 * K / E)
    keep = capacity_keep(indices, weights, E, capacity, policy)
    assert torch.equal(keep, _python_capacity_keep(indices, weights, capacity, policy))
    kept_per_expert = torch.bincount(indices[keep], minlength=E)
    assert kept_per_expert.max() <= capacity and (not keep.all() or factor > 1)


def test_expert_bias_changes_selection_only(solo_groups):
    z = logits()
    bias = torch.zeros(E)
    bias[5] = 10.0
    weights, indices = topk_routing(z, K, "sigmoid", True, bias)
    plain_weights, plain_indices = topk_routing(z, K, "sigmoid", True)
    assert (indices == 5).any(1).all() and not torch.equal(indices, plain_indices)
    assert torch.equal(weights, torch.sigmoid(z).gather(1, indices))  # unbiased scores of the chosen experts

    router = TopKRouter(config(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.5), solo_groups,
                        ModelContext(), 0)
    assert "expert_bias" in router.state_dict() and "tokens_per_expert" not in router.state_dict()


def test_expert_bias_moves_against_the_load(solo_groups):
    cfg = config(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.5)
    layer = MoELayer(cfg, solo_groups, ModelContext(), 0)
    initialize_parameters(list(layer.named_parameters()), 3)
    x = torch.randn(16, 2, H, generator=torch.Generator().manual_seed(2))
    layer.eval()
    layer(x)
    assert layer.router.tokens_per_expert.sum() == 0  # evaluation does not count
    layer.train()
    layer(x)
    counts = layer.router.tokens_per_expert.clone()
    assert counts.sum() == 16 * 2 * K
    update_expert_biases(layer, solo_groups)
    expected = 0.5 * torch.sign(counts.mean() - counts)
    assert torch.equal(layer.router.expert_bias, expected)
    assert (expected[counts > counts.mean()] < 0).all() and (expected[counts < counts.mean()] > 0).all()
    assert layer.router.tokens_per_expert.sum() == 0


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_aux_losses_reach_the_gradient_with_the_set_scale(score_function, solo_groups):
    """Gradient of the layer with coefficients == gradient of (output loss + scale x (a x aux + z x zloss)) written
    out by hand, and the logged values are the hand-written losses."""
    a, zc, scale = 0.3, 0.05, 0.25
    x = torch.randn(8, 3, H, generator=torch.Generator().manual_seed(4))
    g = torch.randn(8, 3, H, generator=torch.Generator().manual_seed(5))

    def run(**coeffs):
        context = ModelContext()
        context.aux_losses.scale = scale
        layer = MoELayer(config(moe_router_score_function=score_function, **coeffs), solo_groups, context, 0)
        initialize_parameters(list(layer.named_parameters()), 11)
        xx = x.clone().requires_grad_()
        return layer, xx, (layer(xx) * g).sum()

    layer, xx, loss = run(moe_aux_loss_coeff=a, moe_z_loss_coeff=zc)
    loss.backward()
    logged = layer.context.aux_losses.pop()

    ref, rx, ref_loss = run()
    z = rx.reshape(-1, H) @ ref.router.weight.t()
    scores = torch.softmax(z, -1) if score_function == "softmax" else torch.sigmoid(z)
    probs = scores / scores.sum(-1, keepdim=True)
    f = torch.bincount(scores.topk(K, -1).indices.reshape(-1), minlength=E) / (z.shape[0] * K)
    aux = E * (f * probs.mean(0)).sum()
    zloss = torch.logsumexp(z, -1).square().mean()
    aux_grad = torch.autograd.grad(scale * (a * aux + zc * zloss), ref.router.weight, retain_graph=True)[0]
    (ref_loss + scale * (a * aux + zc * zloss)).backward()
    assert aux_grad.norm() > 1e-2 * ref.router.weight.grad.norm()  # the aux terms matter at the tolerance below

    assert logged == pytest.approx({"load_balancing_loss/layer0": aux.item(), "z_loss/layer0": zloss.item()})
    torch.testing.assert_close(xx.grad, rx.grad, rtol=1e-5, atol=1e-8)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_recomputation_logs_and_counts_once(solo_groups):
    cfg = config(moe_aux_loss_coeff=0.1, moe_router_enable_expert_bias=True)
    context = ModelContext()
    layer = MoELayer(cfg, solo_groups, context, 3)
    initialize_parameters(list(layer.named_parameters()), 3)
    x = torch.randn(4, 2, H, requires_grad=True)
    recompute(context, layer, x).sum().backward()
    assert layer.router.tokens_per_expert.sum() == 4 * 2 * K
    assert list(context.aux_losses.pop()) == ["load_balancing_loss/layer3"]
    assert not context.recomputing


def test_build_mlp_interleaves_dense_and_moe_layers(solo_groups):
    kinds = [type(build_mlp(config(moe_layer_freq=2, num_layers=4), solo_groups, ModelContext(), i)) for i in range(4)]
    assert kinds == [MoELayer, MLP, MoELayer, MLP]
    pattern = config(moe_layer_freq="([0]+[1]*2)*2", num_layers=6)  # Megatron's list form: Qwen2-MoE's mlp_only
    kinds = [type(build_mlp(pattern, solo_groups, ModelContext(), i)) for i in range(6)]
    assert kinds == [MLP, MoELayer, MoELayer, MLP, MoELayer, MoELayer]
    assert type(build_mlp(config(num_experts=None), solo_groups, ModelContext(), 0)) is MLP
