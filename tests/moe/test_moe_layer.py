"""The MoE layer under EP in {2, 4} x ETP in {1, 2} x dense TP = 1 / TP = 2 / TP = 2 + SP (with CP and DP filling the
world) equals the single-process layer: same outputs, input gradients, gathered parameter gradients (after the
gradient reducer), logged aux losses and expert-bias updates, in fp32 to 1e-5 relative error. The load-balancing and
z-losses are on; cases add capacity dropping, sigmoid scores, pre-softmax, a shared expert and an expert that no
token chooses. Also: the all-to-all bytes of a layer against tokens x top-k x hidden x element size."""
import pytest
import torch

from megalite import comm
from megalite import parallel_state as ps
from megalite.config import ModelConfig
from megalite.context import ModelContext, ParallelKnobs
from megalite.moe import MoELayer, update_expert_biases
from megalite.optim.ddp import GradReducer
from megalite.tensor_parallel import gather_full, get_spec, initialize_parameters
from megalite.testing import run_distributed

SEQ, BATCH, H, E, K, SEED = 8, 2, 16, 8, 2, 5
UNUSED_EXPERT = 3


def config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=H, ffn_hidden_size=8, moe_ffn_hidden_size=8, num_experts=E,
                moe_router_topk=K, swiglu=True, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    return ModelConfig(**(base | overrides))


def replica(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output gradient [s, b, h] of data-parallel replica `d`."""
    g = torch.Generator().manual_seed(100 + d)
    return torch.randn(SEQ, BATCH, H, generator=g), torch.randn(SEQ, BATCH, H, generator=g)


def local_slice(t: torch.Tensor, groups: ps.ProcessGroups, sp: bool) -> torch.Tensor:
    """This rank's part of a replica's tensor: its CP chunk of the sequence, and its TP chunk of that under SP."""
    t = t.chunk(groups.size("cp"), 0)[groups.rank("cp")]
    return t.chunk(groups.size("tp"), 0)[groups.rank("tp")] if sp else t


def run_layer(overrides: dict, tp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1, sp: bool = False,
              replicas: list[int] | None = None) -> dict:
    """Forward/backward this rank's tokens of each replica (a single process: every replica whole, one after the
    other); return outputs, input grads, full parameter grads, logged aux losses and the updated expert bias."""
    groups = ps.initialize_model_parallel(tp=tp, cp=cp, ep=ep, etp=etp)
    cfg = config(**overrides)
    context = ModelContext(ParallelKnobs(sequence_parallel=sp))
    layer = MoELayer(cfg, groups, context, 0)
    initialize_parameters(list(layer.named_parameters()), SEED)
    if cfg.moe_router_enable_expert_bias:
        layer.router.expert_bias[UNUSED_EXPERT] = -10.0
    reducer = GradReducer(list(layer.parameters()), groups)
    outputs, input_grads = [], []
    for d in replicas if replicas is not None else [groups.rank("dp")]:
        x, g = (local_slice(t, groups, sp) for t in replica(d))
        x.requires_grad_()
        y = layer(x)
        (y * g).sum().backward()
        outputs.append(y.detach())
        input_grads.append(x.grad)
    reducer.finish()
    grads = {name: gather_full(p.main_grad, get_spec(p), getattr(groups, get_spec(p).group))
             for name, p in layer.named_parameters()}
    update_expert_biases(layer, groups)
    bias = None if layer.router.expert_bias is None else layer.router.expert_bias.clone()
    ps.destroy_model_parallel(groups)
    return dict(outputs=outputs, input_grads=input_grads, grads=grads, aux=context.aux_losses.pop(), bias=bias)


def _run_cases(cases: list[tuple[dict, dict]]) -> list[dict]:
    return [run_layer(overrides, **layout) for layout, overrides in cases]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_single_process(world: int, cases: list[tuple[dict, dict]]) -> None:
    results = run_distributed(world, _run_cases, cases)
    for i, (layout, overrides) in enumerate(cases):
        tp, cp, sp = layout.get("tp", 1), layout.get("cp", 1), layout.get("sp", False)
        dp = world // (tp * cp)
        ref = run_layer(overrides, replicas=list(range(dp)))
        seen = set()
        for rank in range(world):
            got, where = results[rank][i], (layout, overrides, rank)
            tp_rank, cp_rank, dp_rank = rank % tp, rank // tp % cp, rank // (tp * cp)  # order tp-cp-ep-dp-pp

            def part(t: torch.Tensor) -> torch.Tensor:
                t = t.chunk(cp, 0)[cp_rank]
                return t.chunk(tp, 0)[tp_rank] if sp else t

            assert _rel(got["outputs"][0], part(ref["outputs"][dp_rank])) < 1e-5, where
            assert _rel(got["input_grads"][0], part(ref["input_grads"][dp_rank])) < 1e-5, where
            for name, g in got["grads"].items():
                assert _rel(g, ref["grads"][name]) < 1e-5, (*where, name)
                seen.add(name)
            assert got["aux"].keys() == ref["aux"].keys() == {"load_balancing_loss/layer0", "z_loss/layer0"}
            if ref["bias"] is not None:
                assert torch.equal(got["bias"], ref["bias"]), where
        assert seen == ref["grads"].keys(), layout  # every expert lives somewhere
        for key, value in ref["aux"].items():  # the mean over ranks weighs each replica equally
            assert sum(r[i]["aux"][key] for r in results) / world == pytest.approx(value, rel=1e-5), (layout, key)
        if ref["bias"] is not None:
            assert ref["grads"][f"experts.{UNUSED_EXPERT}.fc1.weight"].abs().sum() == 0  # an expert without tokens
            assert ref["bias"][UNUSED_EXPERT] > -10.0  # ... is pulled back by the update


BIAS = dict(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01)
SHARED = dict(moe_shared_expert_intermediate_size=8)

WORLD4 = [  # EP2/ETP1 x TP1/TP2/TP2+SP, EP2/ETP2 x TP1/TP2+SP, EP4/ETP1 x TP1/TP2/TP2+SP; dropping needs TP = CP = 1
    (dict(ep=2), dict(moe_expert_capacity_factor=1.0, moe_router_score_function="sigmoid")),
    (dict(ep=2), dict(moe_expert_capacity_factor=0.75, moe_token_drop_policy="position", moe_router_pre_softmax=True)),
    (dict(tp=2, cp=2, ep=2), SHARED),
    (dict(tp=2, sp=True, ep=2), SHARED | BIAS),
    (dict(ep=2, etp=2), {}),
    (dict(tp=2, sp=True, ep=2, etp=2), SHARED | BIAS),
    (dict(cp=2, ep=4), BIAS),
    (dict(tp=2, ep=4), {}),
    (dict(tp=2, sp=True, cp=2, ep=4), SHARED),
]
WORLD8 = [  # EP2/ETP2 x TP2, EP4/ETP2 x TP1/TP2/TP2+SP (the reference deployment TP2 CP4 EP4 ETP2)
    (dict(tp=2, ep=2, etp=2), BIAS),
    (dict(cp=2, ep=4, etp=2), {}),
    (dict(tp=2, cp=2, ep=4, etp=2), SHARED),
    (dict(tp=2, sp=True, cp=4, ep=4, etp=2), SHARED | BIAS),
]


def test_moe_layer_on_4_ranks_matches_single_process(world_of_one):
    check_against_single_process(4, WORLD4)


def test_moe_layer_on_8_ranks_matches_single_process(world_of_one):
    check_against_single_process(8, WORLD8)


def _layer_bytes(tp: int, sp: bool, ep: int, etp: int) -> tuple[int, int, int]:
    """All-to-all bytes over the EP group of one layer's forward and backward, and the tokens this rank routed."""
    groups = ps.initialize_model_parallel(tp=tp, ep=ep, etp=etp)
    layer = MoELayer(config(), groups, ModelContext(ParallelKnobs(sequence_parallel=sp)), 0)
    initialize_parameters(list(layer.named_parameters()), SEED)
    x, g = (local_slice(t, groups, sp) for t in replica(groups.rank("dp")))
    key = ("all_to_all", comm.group_name(groups.ep))
    with comm.count_comm() as forward:
        y = layer(x.requires_grad_())
    with comm.count_comm() as backward:
        (y * g).sum().backward()
    routed = SEQ * BATCH // tp
    ps.destroy_model_parallel(groups)
    return forward.bytes[key], backward.bytes[key], routed


@pytest.mark.parametrize("tp, sp, ep, etp", [(2, True, 2, 2), (2, False, 4, 1)])
def test_all_to_all_bytes_per_layer_match_the_formula(tp, sp, ep, etp):
    """Each way (dispatch and combine), forward and backward: sum over ranks of tokens x top-k x hidden x 4 bytes."""
    per_rank = run_distributed(4, _layer_bytes, tp, sp, ep, etp)
    formula = sum(routed * K * H * 4 for _, _, routed in per_rank)
    assert sum(f for f, _, _ in per_rank) / (2 * formula) == 1.0
    assert sum(b for _, b, _ in per_rank) / (2 * formula) == 1.0
