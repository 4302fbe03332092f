"""`megalite bench step`: one training step of the megalite GPT at TP=1 against a plain PyTorch GPT, same run, CPU.

The plain GPT below is written from scratch with ordinary `torch.nn` modules and [b, s, h] activations: token
embedding, pre-norm blocks (fused QKV in the usual [q; k; v] layout, rotary, causal SDPA, GeLU or SwiGLU MLP),
final norm, output layer tied to the embedding, `F.cross_entropy`. It receives the megalite model's weights
(re-ordering the fused QKV rows from megalite's per-group layout), so both compute the same loss; the benchmark
checks that first, which doubles as an independent check of the megalite model's math.

A step is forward + backward + optimizer: megalite's step engine with its `GradReducer` + `MixedPrecisionAdamW` (as
`megalite train` runs it) against `torch.optim.AdamW` + `clip_grad_norm_`, with the same hyper-parameters. Steps alternate between
the two models (the order flips every repetition), after warm-up steps; the median and minimum of each and the
ratio megalite / plain are reported (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megalite.config import MegaliteConfig, ModelConfig, TrainingConfig
from megalite.parser import Parser


# -------------------------------------------------------------------------------------------------- the plain GPT
class PlainBlock(torch.nn.Module):
    """x + proj(attention(norm1(x))), then x + fc2(act(fc1(norm2(x)))) on [b, s, h]."""

    def __init__(self, cfg: ModelConfig, ffn: int):
        super().__init__()
        h, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.kv_heads = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim, self.swiglu = h // self.heads, cfg.swiglu
        bias = not cfg.disable_bias_linear
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.qkv = torch.nn.Linear(h, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=bias)
        self.proj = torch.nn.Linear(self.heads * self.head_dim, h, bias=bias)
        self.fc1 = torch.nn.Linear(h, ffn * (2 if cfg.swiglu else 1), bias=bias)
        self.fc2 = torch.nn.Linear(ffn, h, bias=bias)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = _rope(q.view(b, s, self.heads, d).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, s, self.kv_heads, d).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.heads * d))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PlainGPT(torch.nn.Module):
    """Embedding, blocks, final norm, tied output layer and mean cross entropy; tokens and labels [b, s]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.rotary_base = cfg.rotary_base
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.embed = torch.nn.Embedding(vocab_size, cfg.hidden_size)
        self.blocks = torch.nn.ModuleList(PlainBlock(cfg, _ffn(cfg)) for _ in range(cfg.num_layers))
        self.norm = _norm(cfg)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        freqs = 1.0 / self.rotary_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        angles = torch.outer(torch.arange(tokens.shape[1], dtype=torch.float32), freqs).repeat(1, 2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def _norm(cfg: ModelConfig) -> torch.nn.Module:
    if cfg.normalization == "LayerNorm":
        return torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
    return torch.nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon)


def _ffn(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden_size is None:
        raise ValueError("the plain GPT needs ffn_hidden_size set")
    return cfg.ffn_hidden_size


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [b, heads, s, d] with angles [s, d]; dimension i pairs with i + d/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------------------ megalite <-> plain
def plain_name_and_order(name: str, cfg: ModelConfig) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The plain GPT's name for megalite parameter `name`, and the map from megalite's tensor to the plain one.

    The only re-ordering is the fused QKV: megalite stores, per key/value group, the group's query heads then its
    key then its value; the plain block stores all queries, then all keys, then all values.
    """
    if name == "embedding.weight":
        return "embed.weight", lambda t: t
    if name.startswith("final_norm."):
        return "norm." + name.split(".", 1)[1], lambda t: t
    _, layer, *rest = name.split(".")
    local = ".".join(rest)
    renames = {"input_norm": "norm1", "pre_mlp_norm": "norm2", "attention.qkv": "qkv", "attention.proj": "proj",
               "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
    module, leaf = local.rsplit(".", 1)
    order = _qkv_to_plain(cfg) if module == "attention.qkv" else (lambda t: t)
    return f"blocks.{layer}.{renames[module]}.{leaf}", order


def _qkv_to_plain(cfg: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    groups = cfg.num_query_groups or cfg.num_attention_heads
    per_group = cfg.num_attention_heads // groups
    d = cfg.hidden_size // cfg.num_attention_heads

    def reorder(t: torch.Tensor) -> torch.Tensor:
        blocks = t.reshape(groups, per_group + 2, d, *t.shape[1:])
        q = blocks[:, :per_group].reshape(groups * per_group * d, *t.shape[1:])
        k = blocks[:, per_group].reshape(groups * d, *t.shape[1:])
        v = blocks[:, per_group + 1].reshape(groups * d, *t.shape[1:])
        return torch.cat([q, k, v])

    return reorder


@torch.no_grad()
def copy_weights(megalite_model: torch.nn.Module, plain: PlainGPT, cfg: ModelConfig) -> None:
    """Give `plain` exactly the megalite model's weights; every plain parameter must be set once."""
    plain_params = dict(plain.named_parameters())
    assigned = set()
    for name, p in megalite_model.named_parameters():
        plain_name, order = plain_name_and_order(name, cfg)
        plain_params[plain_name].copy_(order(p))
        assigned.add(plain_name)
    missing = set(plain_params) - assigned
    if missing:
        raise RuntimeError(f"plain GPT parameters without a megalite counterpart: {sorted(missing)}")


# --------------------------------------------------------------------------------------------------- the steps
class StepPair:
    """The megalite GPT (TP=1, one training step of `megalite train`'s engine: the pipeline runtime's schedule
    'none', cross entropy, gradient reducer and optimizer) and the plain GPT with identical weights,
    `torch.optim.AdamW` and `clip_grad_norm_`, the same hyper-parameters and the same batch. Makes its own
    (size-one) process groups on the initialised default group; `close()` destroys them."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, micro_batch_size: int, seed: int = 1234):
        from megalite.arguments import resolve
        from megalite.engine.setup import setup

        if cfg.untie_embeddings_and_output_weights or cfg.num_experts or cfg.recompute_granularity:
            raise ValueError("the plain GPT is dense, with a tied output layer and no recomputation")
        self.cfg = cfg
        self.train = TrainingConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0, micro_batch_size=micro_batch_size,
                                    seed=seed)
        model = dataclasses.replace(cfg, vocab_size=vocab_size, make_vocab_size_divisible_by=1)  # no padded rows
        config, derived = resolve(MegaliteConfig(model=model,
                                                 training=self.train), 1)
        self.run = setup(config, derived)
        self.model = self.run.chunks[0]
        self.plain = PlainGPT(cfg, vocab_size)
        copy_weights(self.model, self.plain, cfg)
        decay = [p for p in self.plain.parameters() if p.ndim > 1]
        no_decay = [p for p in self.plain.parameters() if p.ndim <= 1]
        t = self.train
        self.plain_optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
        )
        data = torch.randint(0, vocab_size, (micro_batch_size, cfg.seq_length + 1),
                             generator=torch.Generator().manual_seed(seed))
        self.tokens, self.labels = data[:, :-1], data[:, 1:]
        self.batches = [{"tokens": self.tokens, "labels": self.labels,
                         "loss_mask": torch.ones(self.tokens.shape, dtype=torch.float32)}]

    def close(self) -> None:
        from megalite import parallel_state as ps

        ps.destroy_model_parallel(self.run.groups)

    def megalite_forward_backward(self) -> float:
        """Zeroed gradients, then the mean loss's gradients in each parameter's `main_grad`; returns the loss."""
        from megalite.engine.step import forward_backward

        self.run.reducer.zero_grad()
        return forward_backward(self.run, self.batches).loss

    def plain_forward_backward(self) -> float:
        """Zeroed gradients, then the mean loss's gradients in each parameter's `grad`; returns the loss."""
        self.plain_optimizer.zero_grad(set_to_none=True)
        loss = self.plain(self.tokens, self.labels)
        loss.backward()
        return loss.item()

    def megalite_step(self) -> float:
        from megalite.engine.step import optimizer_step

        loss = self.megalite_forward_backward()
        optimizer_step(self.run, self.train.lr)
        return loss

    def plain_step(self) -> float:
        loss = self.plain_forward_backward()
        torch.nn.utils.clip_grad_norm_(self.plain.parameters(), self.train.clip_grad)
        self.plain_optimizer.step()
        return loss

    def pairs(self, what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Plain parameter name -> (megalite's tensor in the plain layout, plain's tensor), for `what` in
        'weight' or 'grad' (megalite's gradient is its `main_grad`)."""
        plain = dict(self.plain.named_parameters())
        out = {}
        for name, p in self.model.named_parameters():
            plain_name, order = plain_name_and_order(name, self.cfg)
            q = plain[plain_name]
            out[plain_name] = (order(p.detach() if what == "weight" else p.main_grad),
                               q.detach() if what == "weight" else q.grad)
        return out


def add_timing_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--iters, --warmup and --threads of an interleaved benchmark (`time_interleaved`)."""
    parser.add_argument("--iters", type=int, default=20, help=f"timed {what}")
    parser.add_argument("--warmup", type=int, default=3, help=f"untimed {what} first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steadiest on a shared machine; 0: torch's default)")


def time_interleaved(steps: dict[str, Callable[[], float]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of each step: `warmup` untimed rounds, then `iters` timed rounds whose order flips each
    round, so that drift in the machine's speed affects both alike."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + iters):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The benchmark's model: the flags, megalite's defaults otherwise (the `auto` attention back-end: SDPA on
    CPU); the MLP width defaults as `megalite train` derives it."""
    ffn = args.ffn_hidden_size or (64 * math.ceil(8 * args.hidden_size / 3 / 64) if args.swiglu
                                   else 4 * args.hidden_size)
    return ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=ffn,
                       num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                       seq_length=args.seq_length, normalization=args.normalization, swiglu=args.swiglu)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="megalite bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden (SwiGLU: 8/3 x)")
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=None, help="grouped-query attention; unset: MHA")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="RMSNorm")
    parser.add_argument("--swiglu", action="store_true")
    add_timing_args(parser, "steps of each model")
    args = parser.parse_args(argv)
    if min(args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length, args.micro_batch_size,
           args.vocab_size, args.iters) < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("sizes and --iters must be positive, --warmup and --threads non-negative")
    if args.hidden_size % args.num_attention_heads or (args.hidden_size // args.num_attention_heads) % 2:
        parser.error("--hidden-size must be --num-attention-heads times an even head dimension")
    if args.num_query_groups and args.num_attention_heads % args.num_query_groups:
        parser.error("--num-attention-heads must be a multiple of --num-query-groups")
    return args


def main(argv: list[str]) -> int:
    from megalite.distributed import init_distributed

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    init_distributed("gloo")
    pair = StepPair(model_config(args), args.vocab_size, args.micro_batch_size)
    try:
        return report(pair, args)
    finally:
        pair.close()


def report(pair: StepPair, args: argparse.Namespace) -> int:
    """Check that both models compute the same loss, time both, print the table; 1 if the models differ."""
    cfg = pair.cfg
    n_megalite = sum(p.numel() for p in pair.model.parameters())
    n_plain = sum(p.numel() for p in pair.plain.parameters())
    first_megalite, first_plain = pair.megalite_step(), pair.plain_step()
    if n_megalite != n_plain or abs(first_megalite - first_plain) > 1e-5 * abs(first_plain):
        print(f"ERROR: the models differ: {n_megalite:,} vs {n_plain:,} parameters, "
              f"loss {first_megalite:.8f} vs {first_plain:.8f}")
        return 1
    times = time_interleaved({"megalite": pair.megalite_step, "plain": pair.plain_step}, args.warmup, args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(m / p for m, p in zip(times["megalite"], times["plain"]))
    tokens = args.micro_batch_size * args.seq_length
    print(f"GPT {args.num_layers} layers, hidden {args.hidden_size}, ffn {cfg.ffn_hidden_size}, "
          f"{args.num_attention_heads} heads ({cfg.num_query_groups or args.num_attention_heads} K/V), "
          f"seq {args.seq_length}, micro batch {args.micro_batch_size}, vocab {args.vocab_size}, "
          f"{cfg.normalization}, {'SwiGLU' if cfg.swiglu else 'GeLU'}; {n_plain:,} parameters; fp32, "
          f"{torch.get_num_threads()} CPU thread(s)")
    print(f"first-step loss: megalite {first_megalite:.6f}, plain {first_plain:.6f} (equal to 1e-5)")
    print(f"forward + backward + AdamW step; {args.iters} interleaved steps of each after {args.warmup} warm-up")
    print()
    print(f"| {'model':<22} | {'median ms':>9} | {'min ms':>8} | {'tokens/s':>9} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 10}|{'-' * 11}|")
    for name, label in (("megalite", "megalite GPT (TP=1)"), ("plain", "plain PyTorch GPT")):
        print(f"| {label:<22} | {med[name] * 1e3:9.1f} | {min(times[name]) * 1e3:8.1f} | "
              f"{tokens / med[name]:9.0f} |")
    print()
    print(f"megalite / plain = {med['megalite'] / med['plain']:.3f} (medians), {paired:.3f} (median of the "
          f"per-round ratios), {min(times['megalite']) / min(times['plain']):.3f} (minima)")
    return 0
