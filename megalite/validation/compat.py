"""Rules on Megatron-LM flags megalite accepts: refused where megalite cannot honour them, checked where it does."""
from __future__ import annotations

from megalite.config import MegaliteConfig
from megalite.validation.core import Defaults


def fp8_refused(c: MegaliteConfig, d: Defaults) -> str | None:
    g = c.megatron
    given = [f for f, v in [("--fp8-format", g.fp8_format), ("--fp8-amax-history-len", g.fp8_amax_history_len),
                            ("--fp8-amax-compute-algo", g.fp8_amax_compute_algo),
                            ("--fp8-param-gather", g.fp8_param_gather or None)] if v is not None]
    if given:
        return (f"{', '.join(given)}: megalite does not implement fp8 training (it needs Transformer Engine's fp8 "
                "recipes); drop the fp8 flags and train in --bf16.")
    return None


def decoupled_lr_refused(c: MegaliteConfig, d: Defaults) -> str | None:
    g = c.megatron
    if g.decoupled_lr is not None or g.decoupled_min_lr is not None:
        return ("--decoupled-lr / --decoupled-min-lr: a learning rate of its own for the embedding and output layer "
                "is not implemented in megalite; drop them (every parameter then follows --lr).")
    return None


def rampup_batch_size_refused(c: MegaliteConfig, d: Defaults) -> str | None:
    if c.megatron.rampup_batch_size is not None:
        return ("--rampup-batch-size: ramping the global batch up is not implemented in megalite; drop it (the run "
                "then uses --global-batch-size from the first step).")
    return None


def rotary_positions_only(c: MegaliteConfig, d: Defaults) -> str | None:
    m = c.model
    if m.position_embedding_type != "rope":
        return (f"--position-embedding-type {m.position_embedding_type}: megalite implements rotary position "
                "embeddings only; use --position-embedding-type rope.")
    if m.rotary_percent != 1.0:
        return f"--rotary-percent {m.rotary_percent}: megalite rotates the whole head (1.0) only."
    return None


def sequence_within_max_positions(c: MegaliteConfig, d: Defaults) -> str | None:
    m = c.model
    if m.max_position_embeddings is not None and m.seq_length > m.max_position_embeddings:
        return (f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}; raise "
                "--max-position-embeddings or shorten the sequence.")
    return None


def schedule_in_iterations_or_samples(c: MegaliteConfig, d: Defaults) -> str | None:
    t = c.training
    for iters, samples, name in [(t.lr_decay_iters, t.lr_decay_samples, "decay"),
                                 (t.lr_warmup_iters or None, t.lr_warmup_samples, "warmup")]:
        if iters is not None and samples is not None:
            return f"--lr-{name}-iters and --lr-{name}-samples are both set; give one."
    return None


def tokenizer_usable(c: MegaliteConfig, d: Defaults) -> str | None:
    data = c.data
    if data.tokenizer_type == "Llama2Tokenizer":
        return ("--tokenizer-type Llama2Tokenizer (a SentencePiece model) is not supported; give the model's "
                "tokenizer.json: --tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH/tokenizer.json.")
    gpt2 = data.tokenizer_type == "GPT2BPETokenizer" or (data.vocab_file and data.tokenizer_type == "ByteTokenizer")
    if gpt2 and not (data.vocab_file and data.merge_file):
        return "GPT-2's BPE tokenizer needs --vocab-file gpt2-vocab.json and --merge-file gpt2-merges.txt."
    if data.tokenizer_type == "NullTokenizer" and not c.model.vocab_size:
        return "--tokenizer-type NullTokenizer needs --vocab-size (the ids are used as they are)."
    return None
