"""Set-up of a model on the engine: process groups, the model context, this rank's model chunks, and for a trained
model its gradient reducer and optimizer. A frozen model (e.g. an RL reference) is the same chunks without either.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from megalite import parallel_state as ps
from megalite.arguments import Derived
from megalite.config import MegaliteConfig
from megalite.context import ModelContext, ParallelKnobs
from megalite.distributed import device as current_device
from megalite.memory import MemoryEstimate, estimate_memory
from megalite.models.gpt import GPTModel
from megalite.optim.ddp import GradReducer
from megalite.optim.optimizer import MixedPrecisionAdamW
from megalite.parallel_state import ProcessGroups
from megalite.pipeline.actions import Schedule
from megalite.pipeline.schedules import build_schedule
from megalite.pipeline.validate import peak_activations
from megalite.tensor_parallel.random import RNGTracker


def with_vocab_size(config: MegaliteConfig, tokenizer_vocab: int) -> MegaliteConfig:
    """`config` with the model's vocabulary: --vocab-size, else the tokenizer's (the model pads it)."""
    m = config.model
    return dataclasses.replace(config, model=dataclasses.replace(m, vocab_size=m.vocab_size or tokenizer_vocab))


def knobs_of(config: MegaliteConfig) -> ParallelKnobs:
    """The parallel knobs a model of `config` is built with."""
    p = config.parallel
    return ParallelKnobs(sequence_parallel=p.sequence_parallel, cp_comm_type=p.cp_comm_type)


def build_schedule_for(config: MegaliteConfig, derived: Derived, num_microbatches: int,
                       forward_only: bool = False) -> Schedule:
    """The schedule of --pipeline-schedule ('none' without pipeline parallelism) for `num_microbatches`."""
    p = config.parallel
    if p.pipeline_model_parallel_size == 1:
        return build_schedule("none", 1, num_microbatches, forward_only=forward_only)
    chunks = derived.virtual_pipeline_size if p.pipeline_schedule == "interleaved" else None
    return build_schedule(p.pipeline_schedule, p.pipeline_model_parallel_size, num_microbatches, chunks,
                          forward_only=forward_only)


@dataclass
class Run:
    """One model on this rank: its chunks (one per pipeline stage it holds), their shared context, the layout, and
    for a trained model the gradient reducer and optimizer (None for a frozen model)."""

    config: MegaliteConfig
    derived: Derived
    groups: ProcessGroups
    model: torch.nn.ModuleList
    context: ModelContext
    reducer: GradReducer | None
    optimizer: MixedPrecisionAdamW | None
    device: torch.device
    dtype: torch.dtype
    schedules: dict[tuple[int, bool], Schedule] = field(default_factory=dict)
    """Schedules built so far, by (number of microbatches, forward only)."""

    @property
    def chunks(self) -> list[GPTModel]:
        return list(self.model)

    @property
    def is_last_stage(self) -> bool:
        return any(c.post_process for c in self.chunks)

    @property
    def logs(self) -> bool:
        """This rank prints the log: it holds the last stage, and is the first TP rank and first DP x CP rank."""
        g = self.groups
        return self.is_last_stage and g.rank("tp") == 0 and g.rank("dp_cp") == 0

    def schedule(self, num_microbatches: int | None = None, forward_only: bool = False) -> Schedule:
        """The pipeline schedule for `num_microbatches` (default: a training step's), built once."""
        key = (num_microbatches or self.derived.num_microbatches, forward_only)
        if key not in self.schedules:
            self.schedules[key] = build_schedule_for(self.config, self.derived, *key)
        return self.schedules[key]


def rank_memory_estimate(config: MegaliteConfig, derived: Derived, chunks: list[GPTModel], schedule: Schedule,
                         groups: ProcessGroups, device_type: str) -> MemoryEstimate:
    """This rank's memory estimate: its parameters, and the activations of the most microbatches its pipeline
    schedule keeps in flight (one without pipelining; from F until W where the backward is split)."""
    in_flight = 1.0 if schedule.pp == 1 else peak_activations(schedule, until="W")[groups.rank("pp")]
    return estimate_memory([p for c in chunks for p in c.parameters()], config, derived, in_flight,
                           sum(len(c.layers) for c in chunks), any(c.post_process for c in chunks), device_type)


def build_chunks(config: MegaliteConfig, groups: ProcessGroups, context: ModelContext, schedule: Schedule,
                 device: torch.device, dtype: torch.dtype) -> list[GPTModel]:
    """This rank's model chunks on `device`, each initialised from the seed as the full model would be.

    Stage s of S holds layers [s L/S, (s+1) L/S); stage 0 adds the embedding and stage S-1 the head. When one
    rank holds both ends (zb-v), the tied output layer uses the very embedding parameter of the first stage.
    """
    m = config.model
    rank = groups.rank("pp")
    per_stage = m.num_layers // schedule.num_stages
    chunks = []
    for s in (schedule.stage(rank, c) for c in range(schedule.num_chunks)):
        # Built on the device (moving a module may replace its parameters, and with them their shard specs);
        # on the meta device (`megalite plan memory`) there is nothing to initialise.
        with device:
            chunk = GPTModel(m, groups, context,
                             layer_ids=list(range(s * per_stage, (s + 1) * per_stage)),
                             pre_process=s == 0, post_process=s == schedule.num_stages - 1)
        if device.type != "meta":
            chunk.initialize(config.training.seed)
        chunks.append(chunk.to(dtype=dtype))
    first = next((c for c in chunks if c.pre_process), None)
    for c in chunks:
        if c.tied and c.post_process and first is not None and c is not first:
            c.embedding = first.embedding
    return chunks


def single_use_params(chunks: list[GPTModel]) -> list[torch.nn.Parameter]:
    """Parameters each product of a pass uses once: all but the embedding weights (a tied one is also the output
    layer's weight), whose gradients may go straight into their main gradient."""
    embeddings = {id(c.embedding.weight) for c in chunks if c.pre_process or (c.post_process and c.tied)}
    return [p for c in chunks for p in c.parameters() if id(p) not in embeddings]


def tied_copies(chunks: list[GPTModel]) -> list[torch.nn.Parameter]:
    """The last stage's copy of a tied embedding whose first stage lives on another rank."""
    if any(c.pre_process for c in chunks):
        return []
    return [c.embedding.weight for c in chunks if c.tied and c.post_process]


def embedding_group_params(chunks: list[GPTModel]) -> list[torch.nn.Parameter]:
    """Tied embedding weights whose gradients are summed over the embedding group (first and last stage on two
    different ranks)."""
    holds_first = any(c.pre_process for c in chunks)
    holds_last = any(c.post_process for c in chunks)
    if holds_first == holds_last or not chunks[0].tied:
        return []
    return [c.embedding.weight for c in chunks if c.pre_process or c.post_process]


def dtype_of(config: MegaliteConfig) -> torch.dtype:
    t = config.training
    return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32


def setup(config: MegaliteConfig, derived: Derived, *, trainable: bool = True,
          groups: ProcessGroups | None = None) -> Run:
    """Groups (made for the layout unless given), the model context, this rank's chunks and, if `trainable`, the
    gradient reducer and optimizer, for a resolved config with its vocabulary set."""
    p, t = config.parallel, config.training
    if groups is None:
        groups = ps.initialize_model_parallel(
            tp=p.tensor_model_parallel_size, cp=p.context_parallel_size, pp=p.pipeline_model_parallel_size,
            ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size, order=p.rank_order,
            timeout_minutes=p.distributed_timeout_minutes,
        )
    device = current_device()
    assert config.model.vocab_size is not None, "resolve the vocabulary first"
    context = ModelContext(knobs_of(config), RNGTracker.seeded(t.seed, groups.rank("tp"), groups.rank("pp"), device))
    schedule = build_schedule_for(config, derived, derived.num_microbatches)
    chunks = build_chunks(config, groups, context, schedule, device, dtype_of(config))
    model = torch.nn.ModuleList(chunks)
    reducer = optimizer = None
    if trainable:
        reducer = GradReducer(list(model.parameters()), groups, bucket_size=t.ddp_bucket_size,
                              overlap=t.overlap_grad_reduce, distributed=t.use_distributed_optimizer,
                              tied_params=embedding_group_params(chunks),
                              chunks=[list(c.parameters()) for c in chunks], fusable=single_use_params(chunks))
        context.grad_sink = reducer.accumulate_in_place
        optimizer = MixedPrecisionAdamW(reducer, groups, t, not_counted=tied_copies(chunks))
    else:
        model.requires_grad_(False)
    run = Run(config, derived, groups, model, context, reducer, optimizer, device, dtype_of(config))
    run.schedules[(derived.num_microbatches, False)] = schedule
    return run
