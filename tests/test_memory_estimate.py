"""The start-up memory estimate: the per-layer activation formula against the bytes megalite's layer really
saves for backward (saved-tensor hooks, bf16, CPU), and the estimate's other terms."""
import pytest

from megalite.bench.memory import Case, Shape, run_cases
from megalite.config import ModelConfig
from megalite.memory import layer_activation_bytes

PAPER = Shape(seq_length=64, micro_batch_size=2, hidden_size=128, num_attention_heads=4)
MODERN = Shape(seq_length=64, micro_batch_size=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
               swiglu=True, normalization="RMSNorm")
FUSED = dict(backend="auto", attention_dropout=0.0)  # the fused CPU kernel: no s x s matrix kept
CASES = [Case(1, **FUSED), Case(2, **FUSED), Case(2, sequence_parallel=True, **FUSED),
         Case(2, sequence_parallel=True, selective=True, **FUSED)]


def _formula(shape: Shape, case: Case) -> float:
    model = ModelConfig(hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
                        swiglu=shape.swiglu, normalization=shape.normalization, hidden_dropout=0.1)
    return layer_activation_bytes(
        model, seq=shape.seq_length, micro_batch=shape.micro_batch_size, tp=case.tp,
        sequence_parallel=case.sequence_parallel, dtype_bytes=2, device_type="cpu",
        query_groups=shape.num_query_groups or shape.num_attention_heads, ffn_hidden_size=4 * shape.hidden_size,
        selective=case.selective,
    )


@pytest.mark.parametrize("shape", [PAPER, MODERN], ids=["layernorm_gelu_mha", "rmsnorm_swiglu_gqa"])
def test_layer_formula_is_what_the_layer_saves_to_the_byte(shape):
    measured = run_cases(CASES, shape)
    for case, memory in zip(CASES, measured):
        assert memory.total == _formula(shape, case), (case.label, memory.total, _formula(shape, case))


def test_fp32_cpu_layer_formula_counts_the_blocked_attentions_probabilities_to_the_byte():
    """fp32 on CPU, no attention dropout: 'auto' runs the blocked causal kernel, which keeps its probabilities (seq 80:
    blocks of 32, 32 and 16 rows) instead of the log-sum-exp; with selective recompute it keeps nothing."""
    from megalite.backends.blocked_attention import kept_probabilities

    shape = Shape(seq_length=80, micro_batch_size=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  swiglu=True, normalization="RMSNorm", dtype="float32")
    cases = [Case(1, **FUSED), Case(2, sequence_parallel=True, **FUSED),
             Case(2, sequence_parallel=True, selective=True, **FUSED)]
    model = ModelConfig(hidden_size=64, num_attention_heads=4, swiglu=True, normalization="RMSNorm",
                        hidden_dropout=0.1)
    assert kept_probabilities(80) == 32 * 32 + 32 * 64 + 16 * 80
    for case, memory in zip(cases, run_cases(cases, shape)):
        want = layer_activation_bytes(model, seq=80, micro_batch=2, tp=case.tp, sequence_parallel=case.sequence_parallel,
                                      dtype_bytes=4, device_type="cpu", query_groups=2, ffn_hidden_size=256,
                                      selective=case.selective, blocked_attention=True)
        assert memory.total == want, (case.label, memory.total, want)


def test_layer_formula_is_the_papers_34_sbh_on_cuda_for_the_papers_model():
    """Selective recompute, TP+SP, 1-byte masks on CUDA: the paper's 34 sbh/t plus what the paper has no item for,
    the rotary tables (whole on every rank) and LayerNorm's float32 mean and 1/std."""
    s, b, h, a = 4096, 1, 8192, 64
    model = ModelConfig(hidden_size=h, num_attention_heads=a, normalization="LayerNorm", hidden_dropout=0.1)
    got = layer_activation_bytes(model, seq=s, micro_batch=b, tp=8, sequence_parallel=True, dtype_bytes=2,
                                 device_type="cuda", query_groups=a, ffn_hidden_size=4 * h, selective=True)
    rotary_tables, norm_statistics = 2 * s * (h // a) * 2, 2 * (s * b // 8) * 2 * 4
    assert got == 34 * s * b * h / 8 + rotary_tables + norm_statistics


def test_distributed_optimizer_divides_each_parameters_states_by_its_data_parallel_group():
    import torch

    from megalite.arguments import parse_args, resolve
    from megalite.memory import estimate_memory
    from megalite.tensor_parallel.sharding import ShardSpec, set_spec

    flags = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
             "--vocab-size", "128", "--micro-batch-size", "1", "--bf16", "--context-parallel-size", "2",
             "--num-experts", "4", "--expert-model-parallel-size", "2"]  # world 8: DP x CP = 8, EDP = 4
    dense = torch.nn.Parameter(torch.empty(100, dtype=torch.bfloat16))
    expert = set_spec(torch.nn.Parameter(torch.empty(40, dtype=torch.bfloat16)),
                      ShardSpec((40,), data_parallel_group="edp"))
    plain = estimate_memory([dense, expert], *resolve(parse_args(flags), 8), 1, 1, False, "cpu")
    zero = estimate_memory([dense, expert], *resolve(parse_args(flags + ["--use-distributed-optimizer"]), 8), 1, 1,
                           False, "cpu")
    assert plain.optimizer == 140 * 12
    assert zero.optimizer == (100 / 8 + 40 / 4) * 12
    assert (zero.params, zero.grads, zero.activations) == (plain.params, plain.grads, plain.activations)


MOE = dict(num_query_groups=2, swiglu=True, normalization="RMSNorm", num_experts=4, moe_router_topk=2,
           moe_ffn_hidden_size=32)
MOE_CASES = [Case(1, **FUSED), Case(2, **FUSED), Case(2, sequence_parallel=True, **FUSED)]


@pytest.mark.parametrize("shared", [None, 48], ids=["routed_only", "shared_expert"])
def test_moe_layer_formula_is_what_the_layer_saves_to_the_byte(shared):
    """EP = 1, ETP = TP (the default): every rank holds every expert, so its row count is exact."""
    shape = Shape(seq_length=64, micro_batch_size=2, hidden_size=128, num_attention_heads=4,
                  moe_shared_expert_intermediate_size=shared, **MOE)
    model = ModelConfig(hidden_size=128, num_attention_heads=4, swiglu=True, normalization="RMSNorm",
                        hidden_dropout=0.1, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                        moe_shared_expert_intermediate_size=shared)
    for case, memory in zip(MOE_CASES, run_cases(MOE_CASES, shape)):
        want = layer_activation_bytes(model, seq=64, micro_batch=2, tp=case.tp,
                                      sequence_parallel=case.sequence_parallel, dtype_bytes=2, device_type="cpu",
                                      query_groups=2, ffn_hidden_size=512, moe=True, expert_tp=case.tp)
        assert memory.total == want, (case.label, memory.total, want)


def test_moe_layer_formula_is_the_average_over_expert_parallel_ranks():
    """EP > 1: a rank's expert rows depend on the routing, but their sum over the EP group is every pair (x ETP),
    so the measured bytes summed over all ranks equal the formula times the world size."""
    from megalite.bench.memory import measure_cases
    from megalite.testing import run_distributed

    shape = Shape(seq_length=64, micro_batch_size=2, hidden_size=128, num_attention_heads=4,
                  moe_shared_expert_intermediate_size=48, **MOE)
    model = ModelConfig(hidden_size=128, num_attention_heads=4, swiglu=True, normalization="RMSNorm",
                        hidden_dropout=0.1, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                        moe_shared_expert_intermediate_size=48)
    cases = [Case(1, ep=4, **FUSED), Case(2, sequence_parallel=True, ep=2, **FUSED)]
    per_rank = run_distributed(4, measure_cases, cases, shape)
    for i, case in enumerate(cases):
        measured = [memories[i].total for memories in per_rank]
        want = layer_activation_bytes(model, seq=64, micro_batch=2, tp=case.tp,
                                      sequence_parallel=case.sequence_parallel, dtype_bytes=2, device_type="cpu",
                                      query_groups=2, ffn_hidden_size=512, moe=True, expert_tp=case.tp,
                                      expert_parallel=case.ep)
        assert len(set(measured)) > 1, "the routing should load the ranks unevenly"
        assert sum(measured) == 4 * want, (case.label, measured, want)
