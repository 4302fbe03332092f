"""`megalite bench moe`: the grouped experts against the per-expert loop they replace, and the MoE training step
against the code before issue 17, same run, CPU.

Table 1: one MoE layer's forward + backward (router, dispatch, experts, combine; SwiGLU experts, tokens = seq x
batch) for each number of experts and top-k, with the loop (`LocalExperts.grouped = False`, the implementation
before the grouped experts) and every grouped formulation this device runs (megalite/moe/grouped.py), the ratio
of the default one to the loop. Table 2: the training step (forward + backward + AdamW, `megalite train`'s engine)
of a small MoE GPT, run by two processes (megalite/bench/moe_worker.py): one on this megalite, one on the baseline
(`--baseline`: a git revision of this checkout, by default the commit before issue 17's first change, or a
directory holding another megalite); both build the model from the same seed and their first-step losses must
agree. Calls alternate (the order flips every round) after warm-up, as in `megalite bench step`; medians, minima
and the median of the per-round ratios are reported (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from megalite.bench.step import add_timing_args, time_interleaved
from megalite.config import ModelConfig
from megalite.moe.experts import LocalExperts
from megalite.moe.grouped import default_method, grouped_mm_works
from megalite.parser import Parser


PRE_ISSUE_17 = "cba9d6c"
"""The commit before issue 17's first change: table 2's default baseline ("today's implementation" of the issue)."""


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
    parser.add_argument("--baseline", default=PRE_ISSUE_17,
                        help="table 2's 'before': a git revision of this checkout, a directory holding another "
                             "megalite, or 'none' (no table 2)")
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


def this_tree() -> Path:
    """The directory holding this `megalite` package."""
    return Path(__file__).resolve().parents[2]


def baseline_tree(ref: str, workdir: Path) -> Path:
    """A megalite source tree for `ref`: a directory holding `megalite/`, or a git revision of this checkout exported
    into `workdir`. Raises ValueError naming the flag when neither works."""
    if (Path(ref) / "megalite" / "__init__.py").is_file():
        return Path(ref).resolve()
    result = subprocess.run(["git", "-C", str(this_tree()), "archive", "--format=tar", ref, "megalite"],
                            capture_output=True)
    if result.returncode != 0:
        raise ValueError(f"--baseline {ref}: neither a directory holding megalite/ nor a revision of a git checkout at "
                         f"{this_tree()} ({result.stderr.decode().strip() or 'git failed'}); pass a megalite source "
                         "tree, or --baseline none to skip table 2")
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        archive.extractall(workdir, filter="data")
    return workdir


class StepWorker:
    """A `moe_worker` process running the MoE GPT step of the megalite at `tree` (see megalite/bench/moe_worker.py)."""

    def __init__(self, tree: Path, flags: list[str], seed: int, threads: int):
        from megalite.bench import moe_worker

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, "-c", Path(moe_worker.__file__).read_text(), json.dumps(flags), str(seed), str(threads)],
            cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        imported = Path(self._answer("tree")).resolve()
        if not imported.is_relative_to(tree.resolve()):
            raise RuntimeError(f"the step worker for {tree} imported megalite from {imported}")
        self.first_loss = float(self._answer("loss"))

    def _answer(self, key: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(key):
            raise RuntimeError(f"the step worker for {self.tree} stopped ({line.strip() or 'no answer'}); its error "
                               "is printed above")
        return line[len(key):].strip()

    def step(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self._answer("done")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def step_flags(args: argparse.Namespace) -> list[str]:
    """Table 2's model as `megalite train` flags (both trees parse them alike)."""
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size), "--swiglu",
            "--num-attention-heads", str(args.num_attention_heads), "--num-query-groups", str(args.num_query_groups),
            "--ffn-hidden-size", str(args.moe_ffn_hidden_size * 2), "--moe-ffn-hidden-size",
            str(args.moe_ffn_hidden_size), "--num-experts", str(args.num_experts), "--moe-router-topk",
            str(args.moe_router_topk), "--moe-aux-loss-coeff", "0.01", "--seq-length", str(args.seq_length),
            "--normalization", "RMSNorm", "--disable-bias-linear", "--vocab-size", str(args.vocab_size),
            "--make-vocab-size-divisible-by", "1", "--lr", "1e-3", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.micro_batch_size),
            "--seed", "1234"]


def main(argv: list[str]) -> int:
    from megalite.distributed import init_distributed

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="megalite-baseline-") as workdir:
        try:
            before = None if args.baseline == "none" else baseline_tree(args.baseline, Path(workdir))
        except ValueError as e:
            print(f"megalite bench moe: {e}", file=sys.stderr)
            return 2
        init_distributed("gloo")
        rows = layer_table(args)
        steps: dict[str, StepWorker] = {}
        try:
            for name, tree in (("before", before), ("now", this_tree())) if before is not None else ():
                steps[name] = StepWorker(tree, step_flags(args), 1234, args.threads)
            return report(args, rows, steps)
        finally:
            for worker in steps.values():
                worker.close()


def report(args: argparse.Namespace, rows: list[dict], steps: dict[str, StepWorker]) -> int:
    """Print table 1, and table 2 when `steps` holds the two trees' workers; 1 if their first-step losses differ."""
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
    if not steps:
        return 0
    before, now = steps["before"], steps["now"]
    print()
    print(f"Table 2: MoE GPT training step (forward + backward + AdamW, `megalite train`'s engine): {args.num_layers} "
          f"layers, hidden {args.hidden_size}, {args.num_attention_heads} heads / {args.num_query_groups} groups, "
          f"{args.num_experts} experts top-{args.moe_router_topk}, expert ffn {args.moe_ffn_hidden_size}, seq "
          f"{args.seq_length}, batch {args.micro_batch_size}, vocab {args.vocab_size}, fp32, "
          f"{args.threads or 'default'} CPU thread(s); each tree in a process of its own, steps alternated")
    print(f"before: megalite at --baseline {args.baseline} ({before.tree}); now: {now.tree}")
    print(f"first-step loss: before {before.first_loss:.6f}, now {now.first_loss:.6f}", end="")
    if abs(before.first_loss - now.first_loss) > 1e-5 * abs(before.first_loss):
        print("\nERROR: the two trees compute different models (first-step losses differ by more than 1e-5)")
        return 1
    print(" (equal to 1e-5)")
    times = time_interleaved({"before": before.step, "now": now.step}, args.warmup, args.iters)
    med = {m: statistics.median(v) for m, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["now"], times["before"]))
    print()
    print(f"| {'tree':<8} | {'median ms':>9} | {'min ms':>8} |")
    print(f"|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for m in ("before", "now"):
        print(f"| {m:<8} | {med[m] * 1e3:9.1f} | {min(times[m]) * 1e3:8.1f} |")
    print()
    print(f"now / before = {med['now'] / med['before']:.3f} (medians), {paired:.3f} (median of the per-round "
          f"ratios), {min(times['now']) / min(times['before']):.3f} (minima)")
    return 0
