"""Routing replay: after the router weights have changed, a replayed forward routes every token of every MoE layer to
the rollout's experts (and without replay some go elsewhere), with combine weights from the current router; replay
with a capacity factor is refused; training with replayed experts under TP+SP (token slices), CP (zigzag), EP/ETP
and PP (1f1b with full recomputation, zb-v) equals one process."""
import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.engine.setup import setup
from megalite.moe.router import TopKRouter, replayed_routing
from megalite.testing.reference import assert_matches_single_process

MOE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
       "--ffn-hidden-size", "48", "--swiglu", "--vocab-size", "128", "--seq-length", "16", "--num-experts", "4",
       "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16", "--moe-aux-loss-coeff", "0", "--disable-bias-linear",
       "--global-batch-size", "4", "--lr", "1e-3"]


def test_replayed_forward_uses_the_rollout_experts(world_of_one):
    config, derived = resolve(parse_args(MOE + ["--micro-batch-size", "1"]), dist.get_world_size())
    run = setup(config, derived, trainable=False)
    model = run.chunks[0].eval()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), run.context.recording_routing() as rollout:
        model(tokens)
    recorded = torch.stack([rollout[i].transpose(0, 1) for i in sorted(rollout)], dim=2)  # [b, s, layers, k]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TopKRouter):
                m.weight.add_(torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(1)))
        with run.context.recording_routing() as free:
            model(tokens)
        with run.context.recording_routing() as replayed:
            model(tokens, routed_experts=recorded)
    assert any(not torch.equal(free[i], rollout[i]) for i in rollout)  # the new router chooses otherwise
    assert all(torch.equal(replayed[i], rollout[i]) for i in rollout)
    logits = torch.randn(5, 4)
    chosen = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1], [0, 1]])
    weights, _ = replayed_routing(logits, chosen, "softmax", pre_softmax=False)
    scores = torch.softmax(logits, -1).gather(1, chosen)
    torch.testing.assert_close(weights, scores / scores.sum(1, keepdim=True))  # the current router's weights
    ps.destroy_model_parallel(run.groups)


def test_replay_with_a_capacity_factor_is_refused(world_of_one):
    config, derived = resolve(parse_args(MOE + ["--micro-batch-size", "1", "--moe-expert-capacity-factor", "1.0"]), 1)
    run = setup(config, derived, trainable=False)
    with pytest.raises(ValueError, match="routing replay with --moe-expert-capacity-factor is refused"):
        run.chunks[0](torch.zeros(1, 16, dtype=torch.int64),
                      routed_experts=torch.zeros(1, 16, 2, 2, dtype=torch.int64) + torch.tensor([0, 1]))
    ps.destroy_model_parallel(run.groups)


@pytest.mark.parametrize("world, flags", [
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
         "--expert-model-parallel-size", "2", "--micro-batch-size", "2"]),
    (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size",
         "1", "--micro-batch-size", "2"]),
    (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--recompute-granularity",
         "full", "--micro-batch-size", "1"]),
    (2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-v", "--micro-batch-size", "1"]),
], ids=["tp2_sp_cp2_ep2", "tp2_ep2_etp1", "pp2_ep2_recompute", "zbv"])
def test_training_with_replayed_experts_equals_one_process(world_of_one, world, flags):
    model = MOE if "zb-v" not in flags else ["--num-layers", "4"] + MOE[2:]
    assert_matches_single_process(world, model + flags, steps=2, replay=True)
