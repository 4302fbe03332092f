"""`megalite bench moe`: the grouped experts against the per-expert loop they replace, same run, CPU.

Table 1: one MoE layer's forward + backward (router, dispatch, experts, combine; SwiGLU experts, tokens = seq x
batch) for each number of experts and top-k, with the loop (`LocalExperts.grouped = False`, the implementation
before the grouped experts) and every grouped formulation this device runs (megalite/moe/grouped.py), the ratio
of the default one to the loop. Table 2: the training step (forward + backward + AdamW, `megalite train`'s engine)
of a small MoE GPT, built twice from the same seed: as before issue 17 (the expert loop, torch's for-loop AdamW, the
out-of-place cross entropy, weight gradients added to the main gradients) and as now (grouped experts, fused AdamW,
the cross entropy in place, gradient-accumulation fusion); the first step's losses must agree. Calls alternate (the order flips every round) after warm-up, as in `megalite bench step`;
medians, minima and the median of the per-round ratios are reported (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from megalite.bench.step import add_timing_args, time_interleaved
from megalite.config import MegaliteConfig, ModelConfig, TrainingConfig
from megalite.engine.losses import CrossEntropyLoss
from megalite.moe.experts import LocalExperts
from megalite.moe.grouped import default_method, grouped_mm_works
from megalite.parser import Parser
from megalite.tensor_parallel import vocab_parallel_cross_entropy


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="megalite bench moe", description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=_ints, default=[8, 64], help="comma-separated numbers of experts (table 1)")
    parser.add_argument("--topk", type=_ints, default=[2, 8], help="comma-separated top-k values (table 1)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--moe-ffn-hidden-size", type=int, default=352)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-layers", type=int, default=4, help="table 2's model")
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-query-groups", type=int, default=2)
    parser.add_argument("--num-experts", type=int, default=8, help="table 2's model")
    parser.add_argument("--moe-router-topk", type=int, default=2, help="table 2's model")
    parser.add_argument("--vocab-size", type=int, default=8192)
    add_timing_args(parser, "calls of each variant")
    args = parser.parse_args(argv)
    if min(args.hidden_size, args.moe_ffn_hidden_size, args.seq_length, args.micro_batch_size, args.num_layers,
           args.iters, *args.experts, *args.topk) < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("sizes and --iters must be positive, --warmup and --threads non-negative")
    if any(k > e for e in args.experts for k in args.topk) or args.moe_router_topk > args.num_experts:
        parser.error("every top-k must be at most the number of experts")
    return args


def _methods(args: argparse.Namespace) -> list[str]:
    """The grouped formulations to time on this device (CPU), the default first."""
    dtype, device = torch.float32, torch.device("cpu")
    aligned = all(w * 4 % 16 == 0 for w in (args.hidden_size, args.moe_ffn_hidden_size))
    default = default_method(device, dtype, aligned)
    others = [m for m in ("blocked", "grouped_mm", "bmm") if m != default and (m != "grouped_mm" or (
        aligned and grouped_mm_works(device.type, dtype)))]
    return [default, *others]


def _set_experts(model: torch.nn.Module, method: str) -> None:
    """'loop', or a grouped formulation, for every `LocalExperts` in `model`."""
    for m in model.modules():
        if isinstance(m, LocalExperts):
            m.grouped, m.method = method != "loop", None if method == "loop" else method


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def layer_table(args: argparse.Namespace) -> list[dict]:
    """Table 1's rows: per (experts, top-k), the median ms of each variant; checks they compute the same."""
    from megalite import parallel_state as ps
    from megalite.context import ModelContext, ParallelKnobs
    from megalite.moe import MoELayer
    from megalite.tensor_parallel import initialize_parameters

    variants = ["loop", *_methods(args)]
    rows = []
    for experts in args.experts:
        for topk in args.topk:
            groups = ps.initialize_model_parallel()
            cfg = ModelConfig(num_layers=1, hidden_size=args.hidden_size, num_attention_heads=1, swiglu=True,
                              num_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                              moe_aux_loss_coeff=0.01)
            layer = MoELayer(cfg, groups, ModelContext(ParallelKnobs()), 0)
            initialize_parameters(list(layer.named_parameters()), 1234)
            g = torch.Generator().manual_seed(experts * 100 + topk)
            x = torch.randn(args.seq_length, args.micro_batch_size, args.hidden_size, generator=g).requires_grad_()
            dy = torch.randn(x.shape, generator=g)

            def call(method: str) -> tuple[torch.Tensor, torch.Tensor]:
                _set_experts(layer, method)
                x.grad = None
                layer.zero_grad(set_to_none=True)
                y = layer(x)
                y.backward(dy)
                return y.detach(), x.grad

            ref = call("loop")
            for method in variants[1:]:
                out = call(method)
                if max(_rel(out[0], ref[0]), _rel(out[1], ref[1])) > 1e-5:
                    raise RuntimeError(f"{method} differs from the loop at {experts} experts, top-{topk}")
            times = time_interleaved({m: (lambda m=m: call(m)) for m in variants}, args.warmup, args.iters)
            rows.append(dict(experts=experts, topk=topk, med={m: statistics.median(v) for m, v in times.items()}))
            ps.destroy_model_parallel(groups)
    return rows


class _OutOfPlaceCrossEntropy(CrossEntropyLoss):
    """Pretraining's loss as before issue 17: the cross entropy leaves the logits alone (a second logits-sized
    tensor)."""

    def per_token(self, logits: torch.Tensor, batch: dict, groups) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, batch["labels"], groups.tp, in_place=False)


class MoEStep:
    """One `megalite train` step (schedule 'none', gradient reducer, `MixedPrecisionAdamW`) of an MoE GPT whose
    experts use `method`; its own (size-one) process groups on the initialised default group."""

    def __init__(self, args: argparse.Namespace, method: str, seed: int = 1234):
        from megalite.arguments import resolve
        from megalite.engine.setup import setup

        model = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, swiglu=True,
                            num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                            ffn_hidden_size=args.moe_ffn_hidden_size * 2, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                            num_experts=args.num_experts, moe_router_topk=args.moe_router_topk, moe_aux_loss_coeff=0.01,
                            seq_length=args.seq_length, normalization="RMSNorm", disable_bias_linear=True,
                            vocab_size=args.vocab_size, make_vocab_size_divisible_by=1)
        self.train = TrainingConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0, micro_batch_size=args.micro_batch_size,
                                    seed=seed)
        config, derived = resolve(MegaliteConfig(model=model, training=self.train), 1)
        self.run = setup(config, derived)
        _set_experts(self.run.chunks[0], method)
        self.loss = CrossEntropyLoss()
        if method == "loop":  # before issue 17: the expert loop, torch's for-loop AdamW, out-of-place cross entropy,
            for group in self.run.optimizer.adam.param_groups:  # weight gradients added to the main gradients
                group["fused"] = None
            self.loss = _OutOfPlaceCrossEntropy()
            self.run.context.grad_sink = None
        data = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                             generator=torch.Generator().manual_seed(seed))
        tokens = data[:, :-1]
        self.batches = [{"tokens": tokens, "labels": data[:, 1:], "loss_mask": torch.ones(tokens.shape)}]

    def step(self) -> float:
        from megalite.engine.step import forward_backward, optimizer_step

        self.run.reducer.zero_grad()
        loss = forward_backward(self.run, self.batches, self.loss).loss
        optimizer_step(self.run, self.train.lr)
        return loss

    def close(self) -> None:
        from megalite import parallel_state as ps

        ps.destroy_model_parallel(self.run.groups)


def main(argv: list[str]) -> int:
    from megalite.distributed import init_distributed

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    init_distributed("gloo")
    rows = layer_table(args)
    steps = {m: MoEStep(args, m) for m in ("loop", _methods(args)[0])}
    try:
        return report(args, rows, steps)
    finally:
        for s in steps.values():
            s.close()


def report(args: argparse.Namespace, rows: list[dict], steps: dict[str, MoEStep]) -> int:
    """Print both tables; 1 if the two models' first-step losses differ."""
    variants = list(rows[0]["med"]) if rows else []
    tokens = args.seq_length * args.micro_batch_size
    print(f"Table 1: one MoE layer, forward + backward: {tokens} tokens, hidden {args.hidden_size}, expert ffn "
          f"{args.moe_ffn_hidden_size} (SwiGLU), fp32, {torch.get_num_threads()} CPU thread(s); median ms of "
          f"{args.iters} interleaved calls after {args.warmup} warm-up")
    print()
    width = max(len(v) for v in variants) + 3
    print("| experts | top-k | " + " | ".join(f"{v + ' ms':>{width}}" for v in variants) + f" | {variants[1]}/loop |")
    print("|---------|-------|" + "|".join("-" * (width + 2) for _ in variants) + "|" + "-" * (len(variants[1]) + 7) + "|")
    for r in rows:
        print(f"| {r['experts']:>7} | {r['topk']:>5} | "
              + " | ".join(f"{r['med'][v] * 1e3:{width}.2f}" for v in variants)
              + f" | {r['med'][variants[1]] / r['med']['loop']:.3f} |")
    names = list(steps)
    first = {m: s.step() for m, s in steps.items()}
    if abs(first[names[0]] - first[names[1]]) > 1e-5 * abs(first[names[0]]):
        print(f"ERROR: the models differ: first-step loss {first}")
        return 1
    times = time_interleaved({m: s.step for m, s in steps.items()}, args.warmup, args.iters)
    med = {m: statistics.median(v) for m, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times[names[1]], times["loop"]))
    print()
    print(f"Table 2: MoE GPT training step (forward + backward + AdamW): {args.num_layers} layers, hidden "
          f"{args.hidden_size}, {args.num_attention_heads} heads / {args.num_query_groups} groups, {args.num_experts} "
          f"experts top-{args.moe_router_topk}, expert ffn {args.moe_ffn_hidden_size}, seq {args.seq_length}, batch "
          f"{args.micro_batch_size}, vocab {args.vocab_size}, fp32, {torch.get_num_threads()} CPU thread(s)")
    print(f"first-step loss: loop {first['loop']:.6f}, {names[1]} {first[names[1]]:.6f} (equal to 1e-5)")
    print()
    print(f"| {'implementation':<28} | {'median ms':>9} | {'min ms':>8} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 10}|")
    label = {"loop": "before: loop experts etc.", names[1]: f"now: {names[1]} experts etc."}
    for m in names:
        print(f"| {label[m]:<28} | {med[m] * 1e3:9.1f} | {min(times[m]) * 1e3:8.1f} |")
    print()
    print(f"now / before = {med[names[1]] / med['loop']:.3f} (medians), {paired:.3f} (median of the per-round "
          f"ratios), {min(times[names[1]]) / min(times['loop']):.3f} (minima)")
    return 0
