"""`megalite bench gpu-check` (what `launch/gpu_check.sh` runs): a ready check of one GPU in a few minutes, offline.

1. The CUDA tests (`pytest -k cuda` on the test files with CUDA-only cases; on CPU they skip).
2. Training throughput in bf16 (fp32 on CPU): `megalite train --mock-data` of a dense ~1B Llama-like shape and a MoE
   shape (Qwen1.5-MoE-A2.7B's layer, 4 layers to fit one GPU's optimizer state), a few logged windows; the last window's TFLOP/s per device
   and MFU (model FLOPs, `megalite.flops`) from the log line. Flash-attn / Transformer Engine are used when
   importable (--attention-backend auto).
3. Generation: greedy KV-cache decode (`megalite.inference.generate`) of the dense shape, batch 1 and 16, 128
   prompt + 128 new tokens, new tokens/s.

One table at the end. `--smoke` swaps in tiny shapes and lengths (how the test suite runs it on CPU).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import torch

from megalite.parser import Parser

DENSE_1B = ("--num-layers 16 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 8 --ffn-hidden-size 5632 "
            "--swiglu --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights "
            "--vocab-size 32000 --seq-length 2048 --micro-batch-size 4").split()
MOE = ("--num-layers 4 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 5632 --swiglu "
       "--normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights --vocab-size 32000 "
       "--num-experts 60 --moe-router-topk 4 --moe-ffn-hidden-size 1408 --moe-shared-expert-intermediate-size 5632 "
       "--seq-length 2048 --micro-batch-size 2").split()
TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 --swiglu "
        "--vocab-size 256 --seq-length 64 --micro-batch-size 2").split()
TINY_MOE = TINY + "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32".split()
CUDA_TEST_FILES = ["tests/backends/test_attention_backends.py"]
"""Test files with CUDA-only cases (named test_cuda_*)."""
LINE = re.compile(r"TFLOP/s per device (\S+)(?: \| MFU (\S+)%)?")


def cuda_tests(timeout: int) -> str:
    """'N passed, M skipped' (or the failure summary) of the CUDA test files."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                           *CUDA_TEST_FILES],
                          capture_output=True, text=True, timeout=timeout)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return last.strip("= ")


def train_throughput(shape: list[str], iters: int, precision: list[str]) -> tuple[str, str]:
    """(TFLOP/s per device, MFU %) of the last logged window of a short `megalite train` run."""
    argv = [sys.executable, "-m", "megalite", "train", "--mock-data", *shape, *precision, "--train-iters",
            str(iters), "--log-interval", str(max(iters // 3, 1)), "--lr", "1e-4", "--global-batch-size",
            shape[shape.index("--micro-batch-size") + 1]]
    done = subprocess.run(argv, capture_output=True, text=True)
    found = LINE.findall(done.stdout)
    if done.returncode or not found:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return "failed", tail[:80]
    tflops, mfu = found[-1]
    return tflops, mfu or "-"


def generation(shape: list[str], batches: list[int], prompt: int, new: int) -> list[tuple[int, float]]:
    """(batch, new tokens/s) of greedy decoding, on the GPU when there is one."""
    from megalite import parallel_state as ps
    from megalite.arguments import parse_args, resolve
    from megalite.distributed import init_distributed
    from megalite.engine.setup import setup
    from megalite.inference import Request, SamplingParams, generate

    init_distributed("auto")
    extra = ["--bf16"] if torch.cuda.is_available() else []
    argv = list(shape)
    argv[argv.index("--micro-batch-size") + 1] = "1"
    config, derived = resolve(parse_args(argv + extra + ["--global-batch-size", "1"]), 1)
    run = setup(config, derived, trainable=False)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        requests = [Request(torch.randint(0, config.model.vocab_size, (prompt,), generator=g).tolist(), new,
                            prompt_id=i) for i in range(batch)]
        generate(run, requests, SamplingParams(temperature=0), -1, batch_size=batch)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        generate(run, requests, SamplingParams(temperature=0), -1, batch_size=batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rows.append((batch, batch * new / (time.perf_counter() - started)))
    ps.destroy_model_parallel(run.groups)
    return rows


def main(argv: list[str]) -> int:
    parser = Parser(prog="megalite bench gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and lengths (the test suite, on CPU)")
    parser.add_argument("--iters", type=int, default=30, help="training steps per shape")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
    dense, moe = (TINY, TINY_MOE) if args.smoke else (DENSE_1B, MOE)
    precision = ["--bf16"] if torch.cuda.is_available() else []
    iters = 3 if args.smoke else args.iters
    rows = [("CUDA tests", cuda_tests(240), " ".join(CUDA_TEST_FILES))]
    for name, shape in (("train dense ~1B" if not args.smoke else "train dense (tiny)", dense),
                        ("train MoE 60x top-4" if not args.smoke else "train MoE (tiny)", moe)):
        tflops, mfu = train_throughput(shape, iters, precision)
        rows.append((name, f"{tflops} TFLOP/s per device", f"MFU {mfu}%" if mfu not in ("-", "") else mfu))
    lengths = (8, 8) if args.smoke else (128, 128)
    for batch, rate in generation(dense, [1, 16] if not args.smoke else [1, 2], *lengths):
        rows.append((f"generate dense, batch {batch}", f"{rate:.0f} new tokens/s", f"{lengths[0]}+{lengths[1]}"))
    print(f"megalite GPU check on {gpu}, torch {torch.__version__}, "
          f"{'bf16' if precision else 'fp32'}, {time.perf_counter() - started:.0f} s")
    print("| check | result | detail |")
    print("|---|---|---|")
    for check, result, detail in rows:
        print(f"| {check} | {result} | {detail} |")
    return int(any("failed" in result for _, result, _ in rows))
