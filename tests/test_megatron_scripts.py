"""Megatron-LM's own example scripts port unchanged: every flag of examples/gpt3/train_gpt3_175b_distributed.sh,
examples/llama/train_llama3_8b_h100_fp8.sh and examples/mixtral/train_mixtral_8x7b_distributed.sh (as stored from
Megatron-LM's main branch) is accepted by `megalite train`'s parser; each is honoured, listed at start-up as having
no effect, or refused by a rule with the reason. Pure: parsing and `resolve` only."""
import pytest

from megalite.arguments import ConfigError, parse_args, resolve
from megalite.compat import no_effect

# The flags each script passes (values as in the script, paths replaced by placeholders).
GPT3 = (128, [
    "--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96", "--seq-length", "2048",
    "--max-position-embeddings", "2048", "--attention-backend", "auto",
    "--micro-batch-size", "1", "--global-batch-size", "1536", "--rampup-batch-size", "16", "16", "5859375",
    "--train-iters", "500000", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine",
    "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "430000",
    "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "16",
    "--data-path", "DATA_text_document", "--vocab-file", "gpt2-vocab.json", "--merge-file", "gpt2-merges.txt",
    "--split", "949,50,1",
    "--log-interval", "100", "--save-interval", "10000", "--eval-interval", "1000", "--save", "CKPT", "--load", "CKPT",
    "--eval-iters", "10", "--tensorboard-dir", "TB",
])
LLAMA3 = (8, [
    "--use-mcore-models", "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
    "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8", "--kv-channels", "128",
    "--seq-length", "8192", "--max-position-embeddings", "8192", "--position-embedding-type", "rope",
    "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--swiglu", "--init-method-std", "0.0134", "--attention-backend", "fused", "--apply-layernorm-1p",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--micro-batch-size", "1", "--global-batch-size", "128", "--train-samples", "1953125000",
    "--lr-decay-samples", "1949218748", "--lr-warmup-samples", "3906252", "--lr", "0.00015", "--min-lr", "0.00001",
    "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16", "--grad-reduce-in-bf16",
    "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "1",
    "--exit-duration-in-mins", "235",
    "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
    "--fp8-param-gather",
    "--tensor-model-parallel-size", "1", "--context-parallel-size", "1", "--sequence-parallel",
    "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128256", "--data-cache-path", "CACHE",
    "--tiktoken-pattern", "v2", "--split", "'99,1,0'", "--no-create-attention-mask-in-dataloader",
    "--no-mmap-bin-files", "--num-workers", "1",
    "--log-interval", "1", "--eval-iters", "32", "--eval-interval", "100", "--save-interval", "1000",
    "--log-throughput", "--profile", "--profile-step-start", "4", "--profile-step-end", "6",
    "--ckpt-format", "torch_dist", "--distributed-timeout-minutes", "60", "--save", "CKPT", "--load", "CKPT",
    "--tensorboard-dir", "TB",
])
MIXTRAL = (2, [
    "--use-mcore-models", "--disable-bias-linear", "--seq-length", "256", "--max-position-embeddings", "2048",
    "--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "896", "--num-attention-heads", "2",
    "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
    "--group-query-attention", "--num-query-groups", "2", "--no-masked-softmax-fusion", "--no-position-embedding",
    "--rotary-base", "1000000",
    "--num-experts", "2", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
    "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
    "--overlap-param-gather", "--overlap-grad-reduce",
    "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "tokenizer.model", "--mock-data",
    "--split", "99990,8,2",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-4", "--train-iters", "7", "--min-lr", "1.0e-5",
    "--weight-decay", "0.1", "--clip-grad", "1.0",
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "2",
    "--use-distributed-optimizer", "--sequence-parallel",
    "--eval-iters", "10", "--no-load-optim", "--no-load-rng", "--wandb-project", "Mixtral", "--wandb-exp-name", "M",
])

REFUSED = {  # script: what megalite cannot honour, named in the error
    "gpt3": ["--rampup-batch-size"],
    "llama3": ["does not implement fp8", "--decoupled-lr"],
    "mixtral": ["--tokenizer-type Llama2Tokenizer"],
}
DROP = {  # the refused flags and their values, to check the rest resolves
    "gpt3": {"--rampup-batch-size": 3},
    "llama3": {"--decoupled-lr": 1, "--decoupled-min-lr": 1, "--fp8-format": 1, "--fp8-amax-history-len": 1,
               "--fp8-amax-compute-algo": 1, "--fp8-param-gather": 0},
    "mixtral": {"--tokenizer-type": 1, "--tokenizer-model": 1},
}
SCRIPTS = {"gpt3": GPT3, "llama3": LLAMA3, "mixtral": MIXTRAL}


def _without(argv: list[str], drop: dict[str, int]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in drop:
            i += 1 + drop[argv[i]]
            continue
        out.append(argv[i])
        i += 1
    return out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_of_megatrons_scripts_is_accepted_and_refusals_name_the_reason(name):
    world, argv = SCRIPTS[name]
    config = parse_args(argv)  # an unknown flag would exit here
    with pytest.raises(ConfigError) as refused:
        resolve(config, world)
    for phrase in REFUSED[name]:
        assert phrase in str(refused.value)
    resolve(parse_args(_without(argv, DROP[name])), world)


def test_flags_megalite_has_are_honoured():
    config, derived = resolve(parse_args(_without(LLAMA3[1], DROP["llama3"])), LLAMA3[0])
    m, t, d = config.model, config.training, config.data
    assert m.kv_channels == 128 and m.head_size == 128 and m.max_position_embeddings == 8192
    assert m.attention_backend == "te" and m.apply_layernorm_1p and m.rotary_base == 1000000
    assert t.lr_warmup_iters == 3906252 // 128 and t.lr_decay_iters == 1949218748 // 128
    assert t.exit_duration_in_mins == 235 and t.profile and d.split == "'99,1,0'"
    assert d.tokenizer_type == "NullTokenizer" and m.vocab_size == 128256
    gpt3, _ = resolve(parse_args(_without(GPT3[1], DROP["gpt3"])), GPT3[0])
    assert gpt3.data.tokenizer_type == "GPT2BPETokenizer"  # Megatron's default with --vocab-file


def test_flags_without_effect_are_listed():
    config = parse_args(_without(LLAMA3[1], DROP["llama3"]))
    assert no_effect(config.megatron) == [
        "--use-mcore-models", "--group-query-attention", "--cross-entropy-loss-fusion", "--calculate-per-token-loss",
        "--grad-reduce-in-bf16", "--overlap-param-gather", "--manual-gc", "--empty-unused-memory-level",
        "--log-throughput", "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--num-workers",
        "--tiktoken-pattern"]
