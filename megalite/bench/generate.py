"""`megalite bench generate`: megalite's KV-cache generation against a plain PyTorch KV-cache decode loop of the same
model and against Hugging Face `generate`, in the same run, on CPU.

Models (random weights, fp32, one process): the shape `megalite train` trains by default (4 layers, hidden 128,
4 heads, byte vocabulary) in its Llama form (SwiGLU, no biases, so that Hugging Face has the architecture), and a
small MoE (the same with 2 K/V groups and 8 experts of 128, top-2: Mixtral). For each model and batch size, every
prompt has `--prompt-len` random tokens and every sequence gets exactly `--new-tokens` greedy tokens (no stop
token), by:
- megalite: `megalite.inference.generate` (each prompt prefilled alone, then one decode call per step);
- plain: a from-scratch loop over the same logical weights, written for speed: all prompts prefilled in one call,
  preallocated K/V tensors, one decode call per step, experts as a loop over the experts hit;
- hf: the model exported with `megalite convert`'s tensors (`to_hf`), `model.generate(do_sample=False)`.
Each is checked to produce the same tokens as megalite before timing. Runs alternate (order flipped each round);
medians. tokens/s counts new tokens over the whole call, prefill included. "prefill" is megalite generating one token
per prompt; "train fwd" is the training forward (autograd on) of the same [batch, prompt] tokens: per token, prefill
should be at least as fast. The KV cache's bytes per token are checked against 2 x layers x K/V heads x head dim x
element size.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megalite.bench.step import time_interleaved
from megalite.parser import Parser

SHAPES = {
    "dense": ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--swiglu",
              "--disable-bias-linear", "--vocab-size", "257"],
    "moe": ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--swiglu", "--disable-bias-linear", "--vocab-size", "257", "--num-experts", "8", "--moe-router-topk", "2",
            "--moe-ffn-hidden-size", "128", "--ffn-hidden-size", "128"],
}


# ------------------------------------------------------------------------------------------ the plain decode loop
class PlainDecoder:
    """Greedy generation from megalite's logical weights (TP 1) with plain tensors: RMSNorm, grouped QKV, rotary,
    SDPA over preallocated K/V [b, kv heads, length, d], SwiGLU MLP or top-k softmax MoE, tied or untied head."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg):
        self.w, self.cfg = weights, cfg
        self.heads, self.groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
        self.d = cfg.head_size
        self.head = weights.get("output_weight", weights["embedding.weight"])[: cfg.vocab_size]
        self.inv_freq = 1.0 / cfg.rotary_base ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.cfg.norm_epsilon)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(pos.float(), self.inv_freq).repeat(1, 2)  # [s, d]
        half = self.d // 2
        return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * angles.sin()

    def _mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        if prefix + "router.weight" not in self.w:
            gate, up = F.linear(x, self.w[prefix + "fc1.weight"]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, self.w[prefix + "fc2.weight"])
        flat = x.reshape(-1, x.shape[-1])
        scores = torch.softmax(F.linear(flat, self.w[prefix + "router.weight"]).float(), dim=-1)
        weights, experts = scores.topk(self.cfg.moe_router_topk, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e in experts.unique().tolist():
            token, slot = (experts == e).nonzero(as_tuple=True)
            gate, up = F.linear(flat[token], self.w[f"{prefix}experts.{e}.fc1.weight"]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w[f"{prefix}experts.{e}.fc2.weight"])
            out.index_add_(0, token, y * weights[token, slot].unsqueeze(1))
        return out.view_as(x)

    def _forward(self, tokens: torch.Tensor, start: int, cache: list[tuple[torch.Tensor, torch.Tensor]]
                 ) -> torch.Tensor:
        """Logits of the last position of tokens [b, s] at positions start.. (every row at the same positions)."""
        b, s = tokens.shape
        pos = torch.arange(start, start + s)
        x = self.w["embedding.weight"][tokens]
        per_group = self.heads // self.groups
        for i, (keys, values) in enumerate(cache):
            p = f"layers.{i}."
            qkv = F.linear(self._norm(x, p + "input_norm"), self.w[p + "attention.qkv.weight"])
            qkv = qkv.view(b, s, self.groups, per_group + 2, self.d)
            q = self._rope(qkv[:, :, :, :per_group].reshape(b, s, self.heads, self.d).transpose(1, 2), pos)
            keys[:, :, start:start + s] = self._rope(qkv[:, :, :, per_group].transpose(1, 2), pos)
            values[:, :, start:start + s] = qkv[:, :, :, per_group + 1].transpose(1, 2)
            k, v = keys[:, :, :start + s], values[:, :, :start + s]
            if s == 1:
                attn = F.scaled_dot_product_attention(q, k, v, enable_gqa=per_group > 1)
            else:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=per_group > 1)
            x = x + F.linear(attn.transpose(1, 2).reshape(b, s, -1), self.w[p + "attention.proj.weight"])
            x = x + self._mlp(self._norm(x, p + "pre_mlp_norm"), p + "mlp.")
        return F.linear(self._norm(x[:, -1], "final_norm"), self.head)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy tokens [b, new_tokens] after equal-length prompts [b, p]."""
        b, p = prompts.shape
        shape = (b, self.groups, p + new_tokens, self.d)
        cache = [(torch.empty(shape), torch.empty(shape)) for _ in range(self.cfg.num_layers)]
        out = [self._forward(prompts, 0, cache).argmax(-1)]
        for t in range(1, new_tokens):
            out.append(self._forward(out[-1].unsqueeze(1), p + t - 1, cache).argmax(-1))
        return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------------- the bench
def build(shape: str):
    """The megalite run of a benchmark shape (random weights from the seed, one process)."""
    from megalite.arguments import parse_args, resolve
    from megalite.engine.setup import setup

    config, derived = resolve(parse_args(SHAPES[shape] + ["--micro-batch-size", "1", "--global-batch-size", "1"]), 1)
    return setup(config, derived, trainable=False)


def hf_model(run) -> torch.nn.Module | None:
    """The run's model exported as `megalite convert --to-hf` writes it, loaded by `transformers` (None when it is not
    installed)."""
    try:
        import transformers
    except ImportError:
        return None
    import json
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from megalite.checkpoint.hf_config import hf_config
    from megalite.checkpoint.hf_tensors import to_hf
    from megalite.tensor_parallel import get_spec

    transformers.utils.logging.disable_progress_bar()
    cfg = run.config.model
    logical = {n: p.detach().reshape(get_spec(p).logical()[0]) for n, p in run.chunks[0].named_parameters()}
    with tempfile.TemporaryDirectory() as directory:
        tensors = {k: v.contiguous() for k, v in to_hf(logical, cfg).items()}
        save_file(tensors, str(Path(directory) / "model.safetensors"))
        (Path(directory) / "config.json").write_text(json.dumps(hf_config(cfg)))
        return transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()


def kv_bytes(run) -> tuple[int, int]:
    """(the cache's bytes per token, 2 x layers x K/V heads x head dim x element size)."""
    from megalite.inference import Generator, KVCache

    cfg = run.config.model
    cache = KVCache.allocate(Generator(run, 0).kv_layers, 1, 1, run.dtype, run.device)
    element = torch.tensor([], dtype=run.dtype).element_size()
    return cache.bytes_per_token(), 2 * cfg.num_layers * (cfg.num_query_groups or cfg.num_attention_heads) * \
        cfg.head_size * element


def bench_shape(shape: str, args: argparse.Namespace) -> list[dict]:
    from megalite import parallel_state as ps
    from megalite.inference import Request, SamplingParams, generate

    run = build(shape)
    cfg = run.config.model
    weights = {n: p.detach() for n, p in run.chunks[0].state_dict().items()}
    plain, hf = PlainDecoder(weights, cfg), (None if args.no_hf else hf_model(run))
    greedy = SamplingParams(temperature=0)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
        requests = [Request(p.tolist(), args.new_tokens, prompt_id=i) for i, p in enumerate(prompts)]
        first = [Request(r.prompt, 1, r.prompt_id) for r in requests]

        def ours() -> torch.Tensor:
            return torch.tensor([c.tokens for c in generate(run, requests, greedy, -1, batch_size=batch)])

        def theirs() -> torch.Tensor:
            out = hf.generate(prompts, do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt_len:]

        def train_forward() -> None:
            run.model.train()
            with torch.enable_grad():
                run.chunks[0](prompts).sum()
            run.model.eval()

        tokens = ours()
        calls = {"megalite": ours, "plain": lambda: plain.generate(prompts, args.new_tokens),
                 "prefill": lambda: generate(run, first, greedy, -1, batch_size=batch), "train fwd": train_forward}
        if hf is not None:
            calls["hf"] = theirs
        for name in ("plain", "hf"):
            if name in calls and not torch.equal(calls[name](), tokens):
                raise RuntimeError(f"{name} generates other tokens than megalite ({shape}, batch {batch})")
        times = {k: statistics.median(v) for k, v in time_interleaved(calls, args.warmup, args.iters).items()}
        new, read = batch * args.new_tokens, batch * args.prompt_len
        rows.append({"shape": shape, "batch": batch, "megalite": new / times["megalite"],
                     "plain": new / times["plain"], "hf": new / times["hf"] if "hf" in times else None,
                     "prefill": read / times["prefill"], "train fwd": read / times["train fwd"]})
    measured, formula = kv_bytes(run)
    rows[-1]["kv"] = (measured, formula)
    ps.destroy_model_parallel(run.groups)
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="megalite bench generate", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5, help="timed runs of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-hf", action="store_true", help="leave Hugging Face out even when installed")
    args = parser.parse_args(argv)
    if min(args.batch_sizes + [args.prompt_len, args.new_tokens, args.iters]) < 1 or args.warmup < 0:
        parser.error("sizes, lengths and --iters must be positive, --warmup non-negative")
    return args


def main(argv: list[str]) -> int:
    from megalite.distributed import init_distributed

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    init_distributed("gloo")
    started = time.perf_counter()
    rows = [row for shape in args.shapes for row in bench_shape(shape, args)]
    print(f"greedy generation, {args.prompt_len} prompt tokens + {args.new_tokens} new tokens per sequence, fp32, "
          f"{torch.get_num_threads()} CPU thread(s); new tokens/s (prefill included), median of {args.iters}")
    print()
    print("| model | batch | megalite tok/s | plain tok/s | HF tok/s | megalite/plain | megalite/HF | "
          "prefill tok/s | train fwd tok/s | prefill/train fwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    failed = False
    for r in rows:
        hf = f"{r['hf']:.0f}" if r["hf"] else "-"
        vs_hf = f"{r['megalite'] / r['hf']:.2f}" if r["hf"] else "-"
        print(f"| {r['shape']} | {r['batch']} | {r['megalite']:.0f} | {r['plain']:.0f} | {hf} | "
              f"{r['megalite'] / r['plain']:.2f} | {vs_hf} | {r['prefill']:.0f} | {r['train fwd']:.0f} | "
              f"{r['prefill'] / r['train fwd']:.2f} |")
    print()
    for r in rows:
        if "kv" in r:
            measured, formula = r["kv"]
            ok = measured == formula
            failed |= not ok
            print(f"KV cache, {r['shape']}: {measured} bytes per token; 2 x layers x K/V heads x head dim x "
                  f"element size = {formula} ({'equal' if ok else 'DIFFERENT'})")
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    return int(failed)
