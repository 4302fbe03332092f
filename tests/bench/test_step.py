"""The plain PyTorch GPT of `megalite bench step` and the megalite GPT at TP=1 compute the same thing: same loss,
same gradients and the same parameters after an AdamW step (fp32, relative error under 1e-5). The plain model is
written independently ([b, s, h] activations, standard [q; k; v] layout, nn.Linear/nn.Embedding, F.cross_entropy),
so this checks the megalite model's math, not only the benchmark."""
import pytest
import torch

from megalite.bench import step
from megalite.config import ModelConfig

VOCAB, BATCH = 64, 2


@pytest.fixture
def make_pair(world_of_one):
    """StepPair factory; the pairs' process groups are destroyed after the test."""
    pairs = []

    def make(cfg: ModelConfig) -> step.StepPair:
        pairs.append(step.StepPair(cfg, VOCAB, BATCH))
        return pairs[-1]

    yield make
    for pair in pairs:
        pair.close()


def config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, seq_length=16)
    return ModelConfig(**{**base, **overrides})


VARIANTS = {
    "mha_gelu_layernorm": dict(normalization="LayerNorm"),
    "gqa_swiglu_rmsnorm": dict(num_query_groups=2, swiglu=True),
    "mqa_no_bias": dict(num_query_groups=1, disable_bias_linear=True),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_plain_gpt_matches_megalite_loss_and_gradients(variant, make_pair):
    pair = make_pair(config(**VARIANTS[variant]))
    megalite_loss, plain_loss = pair.megalite_forward_backward(), pair.plain_forward_backward()
    assert abs(megalite_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    grads = pair.pairs("grad")
    assert grads.keys() == dict(pair.plain.named_parameters()).keys()
    for name, (ours, theirs) in grads.items():
        assert _rel(ours, theirs) < 1e-5, name


def test_an_adamw_step_keeps_the_models_equal(make_pair):
    # No biases: Adam's first step is ~lr * sign(g), and the key bias has an exactly-zero gradient whose fp32
    # rounding noise would decide its sign.
    pair = make_pair(config(disable_bias_linear=True))
    for _ in range(2):
        pair.megalite_step()
        pair.plain_step()
    for name, (ours, theirs) in pair.pairs("weight").items():
        assert _rel(ours, theirs) < 1e-5, name
    assert abs(pair.megalite_forward_backward() - pair.plain_forward_backward()) < 1e-5


def test_the_comparison_sees_a_wrong_qkv_layout(make_pair):
    pair = make_pair(config())
    with torch.no_grad():
        qkv = pair.model.layers["0"].attention.qkv.weight
        pair.plain.blocks[0].qkv.weight.copy_(qkv)  # megalite's per-head [q, k, v] rows, not re-ordered
    assert abs(pair.megalite_forward_backward() - pair.plain_forward_backward()) > 1e-4


def test_bench_step_prints_both_times_and_the_ratio(world_of_one, capsys):
    argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--vocab-size", "64", "--iters", "2", "--warmup", "1", "--threads", "0"]
    assert step.main(argv) == 0
    out = capsys.readouterr().out
    assert "megalite GPT (TP=1)" in out and "plain PyTorch GPT" in out
    assert "megalite / plain = " in out
