"""`megalite bench memory`: activation bytes one transformer layer saves for backward, against Korthikanti et al.

"Reducing Activation Recomputation in Large Transformer Models" (Korthikanti et al. 2022, Table 2) counts, per
layer and in bytes with 16-bit activations and 1-byte dropout masks: 34sbh + 5as^2b without parallelism,
sbh(10 + 24/t + 5as/(ht)) with tensor parallelism over t ranks, (34sbh + 5as^2b)/t with sequence parallelism too,
and without the as^2b term under selective recomputation (s sequence, b micro batch, h hidden, a heads).

The measurement is exact, on any device: every tensor autograd saves while the layer runs forward goes
through `torch.autograd.graph.saved_tensors_hooks`; each storage is counted once, with its full size (a saved view
keeps its whole storage alive), and parameters are left out (they are not activations). Module hooks attribute
each storage to the part of the layer that saved it first, so the count can be set against the paper item by item.
The layer is built in bf16 (the paper's 16-bit), as the paper assumes: LayerNorm, GeLU MLP of 4h, multi-head
attention, biases, dropout > 0. TP > 1 runs on gloo ranks of `megalite.testing`.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from megalite.parser import Parser

COMPONENTS = {
    "input_norm": "input norm",
    "attention.qkv": "QKV linear",
    "attention": "attention",
    "attention.proj": "output projection",
    "": "dropouts",
    "pre_mlp_norm": "pre-MLP norm",
    "mlp.fc1": "fc1",
    "mlp": "GeLU",
    "mlp.fc2": "fc2",
}
"""Module name inside the layer -> the paper's item it stands for ("" is the layer itself: its two dropouts)."""


@dataclass(frozen=True)
class Shape:
    """Sizes of the measured layer."""

    seq_length: int
    micro_batch_size: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    swiglu: bool = False
    normalization: str = "LayerNorm"
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    dtype: str = "bfloat16"
    """The paper's model is the default (MHA, GeLU of 4h, LayerNorm, dense); the variants serve the tests of the
    start-up memory estimate."""

    @property
    def sbh(self) -> int:
        return self.seq_length * self.micro_batch_size * self.hidden_size

    @property
    def as2b(self) -> int:
        return self.num_attention_heads * self.seq_length**2 * self.micro_batch_size


@dataclass(frozen=True)
class Case:
    """One parallel layout and attention set-up of the layer."""

    tp: int = 1
    sequence_parallel: bool = False
    selective: bool = False
    backend: str = "eager"
    attention_dropout: float = 0.1
    ep: int = 1
    """Expert parallelism (MoE shapes only; the expert-TP size is the TP size)."""

    @property
    def label(self) -> str:
        parts = [f"TP={self.tp}"] + ["SP"] * self.sequence_parallel + ["selective"] * self.selective
        return "+".join(parts)

    @property
    def attention_label(self) -> str:
        dropout = f"dropout {self.attention_dropout:g}" if self.attention_dropout else "no dropout"
        return f"{self.backend}, {dropout}"


@dataclass
class LayerMemory:
    """Bytes one rank's layer saved for backward, per component (see COMPONENTS), split into the part shaped
    [..., s, s] (attention scores, probabilities, masks) and the rest."""

    rest: dict[str, int] = field(default_factory=dict)
    s2: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rest.values()) + sum(self.s2.values())

    def component(self, name: str) -> int:
        return self.rest.get(name, 0) + self.s2.get(name, 0)


def paper_components(shape: Shape, tp: int, sequence_parallel: bool, selective: bool) -> dict[str, float]:
    """Korthikanti et al.'s bytes per layer, item by item (16-bit activations, 1-byte dropout masks).

    Outside the tensor-parallel region (norm inputs, the inputs of the first linear layers, the dropout masks) the
    activations are split only by sequence parallelism; inside it (attention, projection input, GeLU, fc2) by TP.
    """
    sbh, as2b = shape.sbh, shape.as2b
    u = tp if sequence_parallel else 1
    return {
        "input norm": 2 * sbh / u,                                           # its input
        "QKV linear": 2 * sbh / u,                                           # its input
        "attention": (4 * sbh + 2 * sbh + (0 if selective else 5 * as2b)) / tp,  # Q, K; V; softmax, mask, dropout
        "output projection": 2 * sbh / tp,                                   # its input
        "dropouts": 2 * sbh / u,                                             # two 1-byte masks
        "pre-MLP norm": 2 * sbh / u,
        "fc1": 2 * sbh / u,
        "GeLU": 8 * sbh / tp,                                                # its 4h-wide input
        "fc2": 8 * sbh / tp,
    }


def paper_bytes(shape: Shape, tp: int, sequence_parallel: bool, selective: bool) -> float:
    """The paper's per-layer total: 34sbh + 5as^2b, sbh(10 + 24/t + 5as/(ht)), (34sbh + 5as^2b)/t, 34sbh/t."""
    return sum(paper_components(shape, tp, sequence_parallel, selective).values())


class SavedTensorCounter:
    """Counts the storages autograd saves inside `layer`'s forward, each once, by the component saving it first.

    Run the model's forward inside `active()`; saves outside the layer (embedding, head, loss) are ignored.
    """

    def __init__(self, layer: torch.nn.Module, excluded: list[torch.Tensor], seq_length: int):
        self.layer, self.seq_length = layer, seq_length
        self.excluded = {p.untyped_storage().data_ptr() for p in excluded}
        self.seen: set[int] = set()
        self.memory = LayerMemory()
        self._stack: list[str] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if self._stack and ptr and ptr not in self.excluded and ptr not in self.seen:
            self.seen.add(ptr)
            part = self.memory.s2 if tuple(t.shape[-2:]) == (self.seq_length,) * 2 else self.memory.rest
            name = COMPONENTS[self._stack[-1]]
            part[name] = part.get(name, 0) + storage.nbytes()
        return t

    @contextlib.contextmanager
    def active(self) -> Iterator[LayerMemory]:
        def enter(name: str) -> None:
            self._stack.append(name)

        def leave() -> None:
            self._stack.pop()

        handles = []
        for name, module in self.layer.named_modules():
            if name in COMPONENTS:
                handles.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(name)))
                handles.append(module.register_forward_hook(lambda m, a, o: leave()))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self.memory
        finally:
            for h in handles:
                h.remove()


def measure_layer(case: Case, shape: Shape, seed: int = 1234, device: str = "cpu") -> LayerMemory:
    """Build a one-layer GPT for `case` on this rank (`shape.dtype`, training mode, on `device`) and count what its
    layer saves in one forward pass. Needs torch.distributed initialised with a world size divisible by `case.tp`."""
    from megalite import parallel_state as ps
    from megalite.config import ModelConfig
    from megalite.context import ModelContext, ParallelKnobs
    from megalite.models.gpt import GPTModel
    from megalite.tensor_parallel import RNGTracker, vocab_parallel_cross_entropy

    groups = ps.initialize_model_parallel(tp=case.tp, ep=case.ep)
    try:
        context = ModelContext(ParallelKnobs(sequence_parallel=case.sequence_parallel),
                               RNGTracker.seeded(seed, groups.rank("tp"), device=torch.device(device)))
        vocab = 64 * case.tp
        cfg = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=vocab,
            num_layers=1, hidden_size=shape.hidden_size, ffn_hidden_size=4 * shape.hidden_size,
            num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
            swiglu=shape.swiglu, seq_length=shape.seq_length, normalization=shape.normalization,
            num_experts=shape.num_experts, moe_router_topk=shape.moe_router_topk,
            moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=shape.moe_shared_expert_intermediate_size,
            hidden_dropout=0.1, attention_dropout=case.attention_dropout, attention_backend=case.backend,
            recompute_granularity="selective" if case.selective else None,
        )
        model = GPTModel(cfg, groups, context)
        model.initialize(seed)
        model.to(device=device, dtype=getattr(torch, shape.dtype)).train()
        layer = next(iter(model.layers.values()))
        counter = SavedTensorCounter(layer, list(model.parameters()), shape.seq_length)
        tokens = torch.randint(0, vocab, (shape.micro_batch_size, shape.seq_length),
                               generator=torch.Generator().manual_seed(seed)).to(device)
        with counter.active() as memory:
            losses = vocab_parallel_cross_entropy(model(tokens), tokens, groups.tp)
        del losses
        return memory
    finally:
        ps.destroy_model_parallel(groups)


def measure_cases(cases: list[Case], shape: Shape, device: str = "cpu") -> list[LayerMemory]:
    """`measure_layer` for every case, on this rank; all ranks of the world must call it."""
    return [measure_layer(case, shape, device=device) for case in cases]


def run_cases(cases: list[Case], shape: Shape) -> list[LayerMemory]:
    """Measure every case on a pool of gloo ranks (as many as the largest TP x EP); rank 0's counts."""
    from megalite.testing import run_distributed

    world = max(c.tp * c.ep for c in cases)
    return run_distributed(world, measure_cases, cases, shape)[0]


def default_cases(tp: int) -> list[Case]:
    """The layouts of the paper's Table 2 with the eager and the default attention back-end, and the default
    back-end without attention dropout (where PyTorch's fused CPU kernel runs). tp = 1: the TP=1 rows only."""
    layouts = [(1, False, False), (1, False, True)]
    layouts += [(tp, False, False), (tp, True, False), (tp, True, True)] if tp > 1 else []
    cases = [Case(t, sp, sel, backend) for backend in ("eager", "auto") for t, sp, sel in layouts]
    return cases + [Case(t, t > 1, False, "auto", 0.0) for t in sorted({1, tp})]


# ------------------------------------------------------------------------------------------------------ report
def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f}"


def totals_table(cases: list[Case], results: list[LayerMemory], shape: Shape) -> str:
    """Markdown: measured vs paper per case, with both terms as coefficients of sbh and as^2b bytes."""
    rows = [
        "| layout | attention | measured MiB | paper MiB | measured / paper | sbh coeff. measured | paper "
        "| as²b coeff. measured | paper |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, mem in zip(cases, results):
        paper = paper_components(shape, case.tp, case.sequence_parallel, case.selective)
        paper_s2 = 0.0 if case.selective else 5 * shape.as2b / case.tp
        paper_total = sum(paper.values())
        rest, s2 = sum(mem.rest.values()), sum(mem.s2.values())
        rows.append(
            f"| {case.label} | {case.attention_label} | {_mib(mem.total)} | {_mib(paper_total)} | "
            f"{mem.total / paper_total:5.2f} | {rest / shape.sbh:6.2f} | {(paper_total - paper_s2) / shape.sbh:6.2f}"
            f" | {s2 / shape.as2b:5.2f} | {paper_s2 / shape.as2b:5.2f} |"
        )
    return "\n".join(rows)


def components_table(cases: list[Case], results: list[LayerMemory], shape: Shape) -> str:
    """Markdown: measured vs paper bytes per component (in units of sbh bytes), one column pair per case."""
    head = "| component | " + " | ".join(f"{c.label} ({c.attention_label}) | paper" for c in cases) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(cases)]
    for name in COMPONENTS.values():
        cells = []
        for case, mem in zip(cases, results):
            paper = paper_components(shape, case.tp, case.sequence_parallel, case.selective)[name]
            cells.append(f"{mem.component(name) / shape.sbh:6.2f} | {paper / shape.sbh:6.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="megalite bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-attention-heads", type=int, default=16)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=2,
                        help="t of the TP rows, run on as many gloo ranks (CPU only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the TP=1 rows on this process's GPU (one GPU cannot hold TP ranks)")
    args = parser.parse_args(argv)
    if min(args.seq_length, args.micro_batch_size, args.hidden_size, args.num_attention_heads) < 1:
        parser.error("sizes must be positive")
    t = args.tensor_model_parallel_size
    if t < 2 or args.num_attention_heads % t or args.seq_length % t:
        parser.error("--tensor-model-parallel-size must be at least 2 and divide the heads and the sequence")
    if args.hidden_size % args.num_attention_heads or (args.hidden_size // args.num_attention_heads) % 2:
        parser.error("--hidden-size must be --num-attention-heads times an even head dimension")
    if args.seq_length in (args.hidden_size // args.num_attention_heads, args.micro_batch_size):
        parser.error("--seq-length must differ from the head dimension and the micro batch size "
                     "(tensors are told apart by shape)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    shape = Shape(args.seq_length, args.micro_batch_size, args.hidden_size, args.num_attention_heads)
    if args.device == "cuda":
        from megalite.distributed import init_distributed

        init_distributed("auto")
        cases = default_cases(1)
        results = measure_cases(cases, shape, device="cuda")
    else:
        cases = default_cases(args.tensor_model_parallel_size)
        results = run_cases(cases, shape)
    print(f"one transformer layer, bf16 on {args.device}: s={shape.seq_length} b={shape.micro_batch_size} "
          f"h={shape.hidden_size} a={shape.num_attention_heads} (sbh = {shape.sbh * 2 / 2**20:.2f} MiB at 2 bytes, "
          f"as²b = {shape.as2b * 2 / 2**20:.2f} MiB at 2 bytes); LayerNorm, GeLU 4h, MHA, biases, hidden dropout "
          "0.1; bytes saved for backward by one rank's layer, each storage once, parameters excluded")
    print()
    print(totals_table(cases, results, shape))
    print()
    print("per component, in units of sbh bytes:")
    print()
    picked = [i for i, c in enumerate(cases) if c.backend == "eager" or (c.tp == 1 and not c.selective)]
    print(components_table([cases[i] for i in picked], [results[i] for i in picked], shape))
    return 0
