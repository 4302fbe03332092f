"""Activation memory of one transformer layer (bytes saved for backward, bf16, counted by saved-tensor hooks)
against Korthikanti et al. 2022: sequence parallelism divides every item by t, TP alone only the items inside the
tensor-parallel region, selective recompute drops the s^2 term, and the eager TP=1 total is the paper's formula
once its byte widths are replaced by the ones megalite and PyTorch use on CPU (docs/activation_memory.md)."""
import pytest

from megalite.bench.memory import Case, Shape, paper_bytes, paper_components, run_cases

SHAPE = Shape(seq_length=64, micro_batch_size=2, hidden_size=128, num_attention_heads=4)
T = 2
CASES = {
    "tp1": Case(1),
    "tp1_selective": Case(1, selective=True),
    "tp2": Case(T),
    "tp2_sp": Case(T, sequence_parallel=True),
    "tp2_sp_selective": Case(T, sequence_parallel=True, selective=True),
}
OUTSIDE_TP_REGION = ("input norm", "QKV linear", "dropouts", "pre-MLP norm", "fc1")
INSIDE_TP_REGION = ("output projection", "GeLU", "fc2")

SBH, AS2B = SHAPE.sbh, SHAPE.as2b
HEAD_DIM = SHAPE.hidden_size // SHAPE.num_attention_heads
ROTARY_TABLES = 2 * SHAPE.seq_length * HEAD_DIM * 2
"""cos and sin [s, 1, 1, d] in bf16: saved by the rotary multiplications, whole on every rank."""
CAUSAL_MASK = SHAPE.seq_length**2
"""The eager back-end's boolean [s, s] mask (one byte each), shared by every batch row and head."""


@pytest.fixture(scope="module")
def measured():
    return dict(zip(CASES, run_cases(list(CASES.values()), SHAPE)))


def test_sequence_parallel_divides_every_item_by_t(measured):
    tp1, sp = measured["tp1"], measured["tp2_sp"]
    for name in OUTSIDE_TP_REGION + INSIDE_TP_REGION:
        assert T * sp.component(name) == tp1.component(name), name
    # attention: scores, probabilities, dropout and Q/K/V split over the heads; the rotary tables and the causal
    # mask are whole on every rank
    assert T * (sp.s2["attention"] - CAUSAL_MASK) == tp1.s2["attention"] - CAUSAL_MASK
    assert T * (sp.rest["attention"] - ROTARY_TABLES) == tp1.rest["attention"] - ROTARY_TABLES
    assert sp.total < tp1.total / T + ROTARY_TABLES + CAUSAL_MASK


def test_tensor_parallelism_alone_splits_only_the_tensor_parallel_region(measured):
    tp1, tp2 = measured["tp1"], measured["tp2"]
    for name in OUTSIDE_TP_REGION:
        assert tp2.component(name) == tp1.component(name), name
    for name in INSIDE_TP_REGION:
        assert T * tp2.component(name) == tp1.component(name), name
    assert T * (tp2.rest["attention"] - ROTARY_TABLES) == tp1.rest["attention"] - ROTARY_TABLES


def test_the_gathered_inputs_of_the_sequence_parallel_linears_are_not_kept(measured):
    sp = measured["tp2_sp"]
    for name in ("QKV linear", "fc1"):
        assert sp.component(name) == 2 * SBH / T, name  # the local [s/t, b, h] bf16 input only


def test_selective_recompute_removes_the_s2_term(measured):
    assert sum(measured["tp1"].s2.values()) > 5 * AS2B
    for full, selective in (("tp1", "tp1_selective"), ("tp2_sp", "tp2_sp_selective")):
        kept, dropped = measured[full], measured[selective]
        assert sum(dropped.s2.values()) == 0, selective
        for name in OUTSIDE_TP_REGION + INSIDE_TP_REGION:
            assert dropped.component(name) == kept.component(name), (selective, name)
        # the recomputed core keeps only its inputs Q, K and V (V a copy, not a view of the fused QKV output)
        t = CASES[selective].tp
        assert dropped.component("attention") == (2 + 2 + 2) * SBH / t + ROTARY_TABLES, selective


def test_paper_formula_per_layout():
    sbh, as2b = SBH, AS2B
    assert paper_bytes(SHAPE, 1, False, False) == 34 * sbh + 5 * as2b
    assert paper_bytes(SHAPE, T, False, False) == sbh * (10 + 24 / T) + 5 * as2b / T
    assert paper_bytes(SHAPE, T, True, False) == (34 * sbh + 5 * as2b) / T
    assert paper_bytes(SHAPE, T, True, True) == 34 * sbh / T
    assert sum(paper_components(SHAPE, 1, False, True).values()) == 34 * sbh


def test_eager_tp1_is_the_paper_formula_at_megalite_byte_widths(measured):
    """The paper's items at the widths megalite saves them with on CPU (docs/activation_memory.md): dropout
    masks are bf16 noise tensors (2 bytes, not 1); the eager attention keeps fp32 copies of Q, K, V (12 sbh, not
    6) and fp32 softmax, dropout noise and dropout output (12 as^2b, not 5). The terms the paper leaves out (the
    causal mask, the rotary tables, LayerNorm's per-token mean and rstd) stay under 1.5% of the total."""
    widened = paper_bytes(SHAPE, 1, False, False) + (2 + 6) * SBH + (12 - 5) * AS2B
    norm_statistics = 2 * 2 * SHAPE.seq_length * SHAPE.micro_batch_size * 2
    total = measured["tp1"].total
    assert total == widened + CAUSAL_MASK + ROTARY_TABLES + norm_statistics
    assert abs(total - widened) <= 0.015 * widened


def test_bench_memory_prints_measured_and_paper_tables(capsys):
    from megalite.bench.memory import main

    argv = ["--seq-length", "32", "--micro-batch-size", "1", "--hidden-size", "64", "--num-attention-heads", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| TP=2+SP+selective | eager, dropout 0.1 |" in out and "| TP=1 | auto, no dropout |" in out
    assert "| GeLU |" in out
