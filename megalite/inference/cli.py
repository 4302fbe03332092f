"""`megalite generate`: continue prompts with a trained or imported model, on any layout.

    megalite generate --load CKPT_OR_HF_DIR --prompt "def main(" --max-new-tokens 64
    megalite generate --load CKPT --input prompts.jsonl --output out.jsonl --temperature 0.8 --top-p 0.95
    torchrun --nproc-per-node 4 -m megalite generate --load CKPT --tensor-model-parallel-size 2 --input ...

The model flags come from the checkpoint (a megalite checkpoint's index, or a Hugging Face config.json); the layout
flags of `megalite train` choose how it is spread over the processes. `--prompt` prints each continuation;
`--input` reads JSON lines with a prompt field (`--prompt-key`) and an optional per-line `max_new_tokens`, and
`--output` writes one JSON line per (prompt, sample): the text, the tokens, their log-probabilities before and
after temperature/top-k/top-p, why it stopped, and with `--record-routing` the experts of every token (MoE).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import build_parser, config_from_namespace, resolve
from megalite.checkpoint import load_checkpoint
from megalite.checkpoint.flags import model_flags_from_checkpoint
from megalite.checkpoint.hf_config import is_hf_directory
from megalite.distributed import init_distributed, launched_world_size
from megalite.engine.setup import setup, with_vocab_size
from megalite.errors import ConfigError, DataError
from megalite.inference.engine import Completion, Request, generate
from megalite.inference.sampling import SamplingParams
from megalite.training import checkpoint_meta


def build_generate_parser():
    parser = build_parser("megalite generate")
    parser.description = __doc__.splitlines()[0]
    g = parser.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=None, help="a prompt to continue (repeatable)")
    g.add_argument("--input", type=Path, default=None, help="JSON lines of prompts")
    g.add_argument("--prompt-key", default="prompt", help="the prompt field of --input lines (default: prompt)")
    g.add_argument("--output", type=Path, default=None,
                   help="write JSON lines of completions here (default with --input: standard output)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens per sequence (default: 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most probable tokens; 0: all")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the most probable tokens up to this "
                   "probability; 1: all")
    g.add_argument("--num-samples", type=int, default=1, help="sequences generated per prompt (default: 1)")
    g.add_argument("--batch-size", type=int, default=16, help="sequences decoded together per replica (default: 16)")
    g.add_argument("--record-routing", action="store_true", help="write the experts of every token (MoE models)")
    return parser


def read_prompts(ns, tokenize) -> list[tuple[list[int], int]]:
    """(prompt tokens, max new tokens) of every prompt, from --prompt and --input."""
    prompts = [(text, ns.max_new_tokens, "--prompt") for text in ns.prompt or []]
    if ns.input is not None:
        if not ns.input.is_file():
            raise DataError(f"--input {ns.input}: no such file")
        for number, line in enumerate(ns.input.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{ns.input}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg})") from None
            text = record.get(ns.prompt_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{where}: no string field {ns.prompt_key!r} (set --prompt-key)")
            limit = record.get("max_new_tokens", ns.max_new_tokens)
            if not isinstance(limit, int) or limit < 1:
                raise DataError(f"{where}: max_new_tokens must be a positive integer, got {limit!r}")
            prompts.append((text, limit, where))
    if not prompts:
        raise ConfigError("nothing to generate: give --prompt TEXT or --input prompts.jsonl")
    out = []
    for text, limit, where in prompts:
        tokens = tokenize(text)
        if not tokens:
            raise DataError(f"{where}: the prompt has no tokens")
        out.append((tokens, limit))
    return out


def completion_record(c: Completion, detokenize) -> dict:
    body = c.tokens[:-1] if c.finish_reason == "eod" else c.tokens
    record = {"prompt_id": c.prompt_id, "sample_index": c.sample_index, "text": detokenize(body),
              "tokens": c.tokens, "logprobs": c.logprobs, "sampling_logprobs": c.sampling_logprobs,
              "finish_reason": c.finish_reason}
    if c.routed_experts is not None:
        record["routed_experts"] = c.routed_experts.tolist()
    return record


def main(argv: list[str]) -> int:
    ns = build_generate_parser().parse_args(argv)
    if not ns.load:
        raise ConfigError("--load CKPT_OR_HF_DIR is required: a megalite checkpoint or a Hugging Face model")
    if ns.num_samples < 1 or ns.max_new_tokens < 1 or ns.batch_size < 1:
        raise ConfigError("--num-samples, --max-new-tokens and --batch-size must be >= 1")
    source = model_flags_from_checkpoint(ns)
    if is_hf_directory(ns.load) and ns.tokenizer_type is None and ns.vocab_file is None:
        raise ConfigError(f"--load {ns.load} has no tokenizer.json: give the model's tokenizer with --tokenizer-type "
                          "HuggingFaceTokenizer --tokenizer-model PATH/tokenizer.json")
    config = config_from_namespace(ns)
    try:
        params = SamplingParams(ns.temperature, ns.top_k, ns.top_p, config.training.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resolve(config, launched_world_size())
    from megalite.data.tokenizers import build_tokenizer

    owned = not dist.is_initialized()
    init_distributed(config.parallel.distributed_backend, config.parallel.distributed_timeout_minutes)
    config, derived = resolve(config, dist.get_world_size())
    tokenizer = build_tokenizer(config.data, config.model.vocab_size)
    config = with_vocab_size(config, tokenizer.vocab_size)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {config.model.vocab_size}: "
                          "give the tokenizer the model was trained with (--tokenizer-type/--tokenizer-model)")
    prompts = read_prompts(ns, tokenizer.tokenize)
    requests = [Request(tokens, limit, prompt_id=i, sample_index=j)
                for i, (tokens, limit) in enumerate(prompts) for j in range(ns.num_samples)]
    run = setup(config, derived, trainable=False)
    load_checkpoint(ns.load, run, checkpoint_meta(run), load_optim=False, load_rng=False)
    speaks = dist.get_rank() == 0
    if speaks:
        print(source, file=sys.stderr)
    bar = None
    if speaks:
        from tqdm import tqdm

        share = requests[:: run.groups.size("dp_cp")]
        bar = tqdm(total=sum(r.max_new_tokens for r in share), unit="tok", desc="generate (replica 0)",
                   file=sys.stderr, leave=False)
    started = time.perf_counter()
    completions = generate(run, requests, params, tokenizer.eod, batch_size=ns.batch_size,
                           record_routing=ns.record_routing, progress=bar.update if bar else None)
    elapsed = time.perf_counter() - started
    if bar is not None:
        bar.close()
    if speaks:
        write(ns, completions, tokenizer, elapsed)
    ps.destroy_model_parallel(run.groups)
    if owned:
        dist.destroy_process_group()
    return 0


def write(ns, completions: list[Completion], tokenizer, elapsed: float) -> None:
    """The continuations: printed for --prompt alone, else JSON lines to --output (or standard output)."""
    records = [completion_record(c, tokenizer.detokenize) for c in completions]
    if ns.input is None and ns.output is None:
        for r in records:
            if len(records) > 1:
                print(f"--- prompt {r['prompt_id']}, sample {r['sample_index']} ({r['finish_reason']})")
            print(r["text"])
    else:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if ns.output is None:
            sys.stdout.write(lines)
        else:
            ns.output.parent.mkdir(parents=True, exist_ok=True)
            ns.output.write_text(lines, encoding="utf-8")
    tokens = sum(len(c.tokens) for c in completions)
    print(f"generated {len(completions)} sequences, {tokens} tokens in {elapsed:.2f} s "
          f"({tokens / max(elapsed, 1e-9):.1f} tokens/s)" + (f"; wrote {ns.output}" if ns.output else ""),
          file=sys.stderr)
