"""Typed configuration of a megalite run.

Every field carries its documentation as an attribute docstring right under it; `field_docs` reads those
docstrings and `megalite.arguments` turns them into the `--help` text, so the doc lives in one place.
Field names are Megatron-LM's argument names, so `--tensor-model-parallel-size` sets
`ParallelConfig.tensor_model_parallel_size`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from typing import Literal

from megalite.compat import MegatronCompatConfig
from megalite.sft.config import SFTConfig

RANK_ORDER_DIMS = ("tp", "cp", "ep", "dp", "pp")


def moe_layer_pattern(freq: str | int, num_layers: int) -> list[bool]:
    """--moe-layer-freq as one flag per layer: 'N' makes layer i MoE when i % N == 0; a list '[1,0,...]' or an
    expression of lists, '+' and '*' ('([1]*3+[0])*2', Megatron's form) gives the pattern itself, one entry per
    layer. Raises ValueError (naming the problem) for anything else; the expression is parsed, never evaluated."""
    text = str(freq).strip()  # an int from Python code is the same as the flag N
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ValueError(f"--moe-layer-freq {freq!r}: an integer must be at least 1")
        return [i % n == 0 for i in range(num_layers)]

    def value(node: ast.AST) -> list[int] | int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"--moe-layer-freq {freq!r}: only integers, lists, '+' and '*' are allowed")

    try:
        pattern = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, TypeError) as e:
        raise ValueError(f"--moe-layer-freq {freq!r}: not an integer or a list pattern ({e})") from e
    if not isinstance(pattern, list) or any(x not in (0, 1) for x in pattern):
        raise ValueError(f"--moe-layer-freq {freq!r}: the pattern must be a list of 0 and 1")
    if len(pattern) != num_layers:
        raise ValueError(f"--moe-layer-freq {freq!r}: the pattern has {len(pattern)} entries for --num-layers "
                         f"{num_layers}")
    return [bool(x) for x in pattern]


@dataclass
class ParallelConfig:
    """How the ranks are split: the five parallel dimensions and their layout."""

    tensor_model_parallel_size: int = 1
    """Tensor parallelism (TP): weight matrices are split over this many ranks."""
    context_parallel_size: int = 1
    """Context parallelism (CP): the sequence is split over this many ranks inside attention."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallelism (PP): the layers are split into this many stages."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual pipeline chunk (interleaved 1F1B); unset means one chunk per stage."""
    pipeline_schedule: Literal["1f1b", "interleaved", "zb-h1", "zb-v"] = "1f1b"
    """Pipeline schedule; 'interleaved' needs --num-layers-per-virtual-pipeline-stage, 'zb-v' uses two chunks."""
    expert_model_parallel_size: int = 1
    """Expert parallelism (EP): MoE experts are distributed over this many ranks."""
    expert_tensor_parallel_size: int | None = None
    """Expert tensor parallelism (ETP): each expert's weights split over this many ranks; defaults to TP."""
    sequence_parallel: bool = False
    """Sequence parallelism: split norms, dropout and residuals along the sequence over the TP ranks."""
    rank_order: str = "tp-cp-ep-dp-pp"
    """Order of the parallel dimensions over the ranks, leftmost varying fastest (Megatron-Core's meaning)."""
    cp_comm_type: Literal["p2p", "all_gather"] = "p2p"
    """How context parallelism exchanges K/V: 'p2p' ring, or 'all_gather' once per layer."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective back-end; 'auto' picks NCCL when CUDA is available, else gloo."""
    distributed_timeout_minutes: float = 10.0
    """Timeout of every collective, after which the run fails naming the group instead of hanging."""


@dataclass
class ModelConfig:
    """Shape and numerics of the GPT model (dense and MoE)."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Transformer hidden size."""
    ffn_hidden_size: int | None = None
    """MLP hidden size; defaults to 4 x hidden size (8/3 x hidden size, rounded up to 64, with --swiglu)."""
    num_attention_heads: int = 4
    """Number of attention (query) heads."""
    num_query_groups: int | None = None
    """Key/value head groups for grouped-query attention; unset means one per head (multi-head attention)."""
    kv_channels: int | None = None
    """Head size (query, key and value channels per head); defaults to hidden size / attention heads."""
    seq_length: int = 128
    """Tokens per training sample."""
    max_position_embeddings: int | None = None
    """The longest sequence the model is meant for (Megatron's flag); --seq-length must not exceed it."""
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    """Position encoding; megalite implements rotary embeddings ('rope') only."""
    rotary_percent: float = 1.0
    """Share of the head size rotated by rotary embeddings; megalite rotates all of it (1.0)."""
    vocab_size: int | None = None
    """Vocabulary size (the ids that exist); defaults to the tokenizer's. The model pads its embedding and output
    layer as --make-vocab-size-divisible-by says; padded ids take no part in the softmax."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (independent of the layout, so checkpoints travel)."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalization layer."""
    apply_layernorm_1p: bool = False
    """Norm weights centred on zero: the layer scales by 1 + weight, the weight starting at 0 (Megatron's flag)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""
    swiglu: bool = False
    """Use a SwiGLU MLP instead of GeLU."""
    rotary_base: float = 10000.0
    """Base of the rotary position embedding."""
    untie_embeddings_and_output_weights: bool = False
    """Give the output layer its own weight instead of sharing the input embedding's."""
    disable_bias_linear: bool = False
    """Linear layers without bias."""
    add_qkv_bias: bool = False
    """A bias on the query/key/value projection even with --disable-bias-linear (Qwen2)."""
    qk_layernorm: bool = False
    """Normalise every query and key head over the head size (the --normalization kind) before rotary (Qwen3)."""
    hidden_dropout: float = 0.0
    """Dropout probability after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout probability on attention weights."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation: 'full' recomputes whole layers, 'selective' the attention core."""
    attention_backend: Literal["auto", "sdpa", "eager", "flash", "te", "fused", "unfused", "local"] = "auto"
    """Attention kernel; 'auto' picks the fastest importable one (on CPU, blocked GEMMs for short fp32 causal
    sequences, else SDPA). Megatron's names map to megalite's: 'fused' is Transformer Engine ('te'), 'unfused' the
    plain math ('eager'), 'local' torch's SDPA ('sdpa')."""
    num_experts: int | None = None
    """Number of MoE experts; unset means a dense model."""
    moe_layer_freq: str = "1"
    """Which layers are MoE: N (every N-th layer from layer 0; 1: all), or a 0/1 pattern over the layers written as a
    list '[1,0,1,1]' or Megatron's expression '([1]*3+[0])*2'."""
    moe_router_topk: int = 2
    """Experts chosen per token."""
    moe_ffn_hidden_size: int | None = None
    """Hidden size of each expert; defaults to --ffn-hidden-size."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function."""
    moe_router_pre_softmax: bool = False
    """Normalise the scores over all experts before top-k (otherwise over the chosen top-k)."""
    moe_router_load_balancing_type: Literal["aux_loss", "none"] = "aux_loss"
    """Load balancing: Switch-style auxiliary loss, or none (e.g. with --moe-router-enable-expert-bias)."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing loss."""
    moe_z_loss_coeff: float | None = None
    """Coefficient of the router z-loss; unset disables it."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias for selection, updated by the sign of the load imbalance."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update."""
    moe_expert_capacity_factor: float | None = None
    """Expert capacity as a multiple of the balanced load; tokens beyond it are dropped. Unset: dropless."""
    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    """Which tokens to drop over capacity: lowest router probability, or latest position."""
    moe_shared_expert_intermediate_size: int | None = None
    """Hidden size of the shared expert every token goes through; unset means none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by a per-token gate sigmoid(x W_g) (Qwen2-MoE)."""
    moe_token_dispatcher_type: Literal["alltoall"] = "alltoall"
    """Token dispatcher."""

    @property
    def head_size(self) -> int:
        """Channels per attention head: --kv-channels, else hidden size / heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """The embedding's and the output layer's rows: the vocabulary padded to --make-vocab-size-divisible-by."""
        if self.vocab_size is None:
            raise ValueError("the vocabulary size is not known yet (set --vocab-size or load the tokenizer)")
        return math.ceil(self.vocab_size / self.make_vocab_size_divisible_by) * self.make_vocab_size_divisible_by

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer `layer` has an MoE feed-forward block."""
        return bool(self.num_experts) and moe_layer_pattern(self.moe_layer_freq, self.num_layers)[layer]


@dataclass
class TrainingConfig:
    """Batching, length, optimizer, precision, logging and checkpoints."""

    micro_batch_size: int = 4
    """Samples per microbatch on each data-parallel rank."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all data-parallel ranks; defaults to micro batch x DP."""
    train_iters: int | None = None
    """Optimizer steps; -1 derives it from --train-samples or --train-epochs."""
    train_samples: int | None = None
    """Training samples; -1 derives it from --train-iters or --train-epochs."""
    train_epochs: float | None = None
    """Passes over the training data; needs a dataset to derive the iterations."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: Literal["constant", "linear", "cosine", "WSD"] = "cosine"
    """Learning-rate decay after the warmup."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup."""
    lr_warmup_fraction: float | None = None
    """Warmup as a fraction of the decay iterations (overrides --lr-warmup-iters)."""
    lr_decay_iters: int | None = None
    """Iterations over which the learning rate decays; defaults to --train-iters."""
    lr_decay_samples: int | None = None
    """Samples over which the learning rate decays (instead of --lr-decay-iters: samples / global batch)."""
    lr_warmup_samples: int | None = None
    """Samples of linear warmup (instead of --lr-warmup-iters: samples / global batch)."""
    lr_wsd_decay_iters: int | None = None
    """WSD: iterations of the final decay phase; defaults to 10% of the decay iterations."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and 1-D parameters)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 1234
    """Random seed of initialisation, data order and dropout."""
    bf16: bool = False
    """Train in bfloat16 with fp32 main weights and gradients."""
    fp16: bool = False
    """Train in float16 with dynamic loss scaling and fp32 main weights and gradients."""
    initial_loss_scale: float = 2.0**16
    """fp16: starting loss scale."""
    min_loss_scale: float = 1.0
    """fp16: the loss scale never drops below this."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the loss scale doubles."""
    fp16_max_skipped_steps: int = 100
    """fp16: stop the run after this many consecutive steps skipped for inf/NaN gradients."""
    no_check_for_nan_in_loss_and_grad: bool = False
    """fp32/bf16: skip a step with an inf/NaN gradient norm instead of stopping the run (the default stops it)."""
    log_interval: int = 10
    """Iterations between log lines."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, for the MFU on the log lines; unset: looked up for common GPUs (dense BF16),
    no MFU elsewhere."""
    eval_interval: int | None = None
    """Iterations between validation passes; unset disables validation."""
    eval_iters: int = 10
    """Global batches per validation pass."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here."""
    wandb_project: str | None = None
    """Log the scalars to this Weights & Biases project (WANDB_MODE=offline writes them locally)."""
    wandb_exp_name: str | None = None
    """The Weights & Biases run name."""
    wandb_save_dir: str | None = None
    """Where Weights & Biases keeps its files."""
    save: str | None = None
    """Directory to save checkpoints to."""
    load: str | None = None
    """Directory to resume from (its newest complete checkpoint)."""
    save_interval: int | None = None
    """Iterations between checkpoints."""
    exit_interval: int | None = None
    """Stop after an iteration divisible by this (saving a checkpoint first when --save is set)."""
    exit_duration_in_mins: float | None = None
    """Stop (saving a checkpoint first when --save is set) once the run has lasted this many minutes."""
    profile: bool = False
    """Profile the steps from --profile-step-start to --profile-step-end with torch.profiler (a Chrome trace per rank
    in --tensorboard-dir, else the working directory)."""
    profile_step_start: int = 10
    """First profiled iteration."""
    profile_step_end: int = 12
    """Last profiled iteration."""
    ckpt_format: Literal["torch_dist"] = "torch_dist"
    """Checkpoint format: megalite's layout-free format (safetensors and a JSON index), like Megatron's torch_dist
    loadable under any layout."""
    no_load_optim: bool = False
    """Do not load the optimizer state from the checkpoint."""
    no_load_rng: bool = False
    """Do not load the random states from the checkpoint."""
    ckpt_step: int | None = None
    """Load this iteration of --load instead of its newest checkpoint."""
    override_opt_param_scheduler: bool = False
    """On resume, use this run's learning-rate schedule flags where they differ from the checkpoint's (otherwise such
    a difference is an error)."""
    finetune: bool = False
    """Load only the model weights and start from iteration 0."""
    overlap_grad_reduce: bool = False
    """Reduce gradient buckets during the backward pass."""
    use_distributed_optimizer: bool = False
    """Shard the fp32 main weights and Adam moments over the data-parallel ranks (ZeRO-1): gradients are
    reduce-scattered, each rank updates its share, the weights are all-gathered."""
    ddp_bucket_size: int = 40_000_000
    """Elements per gradient-reduction bucket."""


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: list[str] | None = None
    """Dataset prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'. Unset: the embedded default corpus."""
    split: str = "969,30,1"
    """Train/validation/test proportions."""
    mock_data: bool = False
    """Random tokens instead of a dataset."""
    tokenizer_type: Literal["ByteTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer",
                            "Llama2Tokenizer"] = "ByteTokenizer"
    """Tokenizer: the built-in byte-level one; a local Hugging Face tokenizer.json (--tokenizer-model); GPT-2's BPE
    (--vocab-file, --merge-file; the default with them); ids as they are (NullTokenizer, --vocab-size).
    Llama2Tokenizer (a SentencePiece model) is refused: give the model's tokenizer.json instead."""
    tokenizer_model: str | None = None
    """Path to a Hugging Face tokenizer.json."""
    vocab_file: str | None = None
    """GPT-2 BPE vocabulary (gpt2-vocab.json)."""
    merge_file: str | None = None
    """GPT-2 BPE merges (gpt2-merges.txt)."""
    data_cache_path: str | None = None
    """Directory for cached dataset indices; defaults to beside the data."""
    eod_mask_loss: bool = False
    """Do not compute loss on end-of-document tokens."""
    reset_position_ids: bool = False
    """Restart the position ids after every end-of-document token, so rotary positions count from each document's
    start."""
    reset_attention_mask: bool = False
    """Attention stays inside each document (after every end-of-document token; with --sft, each conversation)."""
    no_data_prefetch: bool = False
    """Read each global batch on the main thread between steps, instead of on a background thread while the
    previous step runs."""


@dataclass
class MegaliteConfig:
    """A whole run."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    megatron: MegatronCompatConfig = field(default_factory=MegatronCompatConfig)


SECTIONS: dict[str, type] = {
    "parallel": ParallelConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "sft": SFTConfig,
    "megatron": MegatronCompatConfig,
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstring written right under each field of dataclass `cls`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    missing = {f.name for f in dataclasses.fields(cls)} - docs.keys()
    if missing:
        raise TypeError(f"{cls.__name__}: fields without a docstring: {sorted(missing)}")
    return docs
