"""Generation on the training layout: the trainer's model chunks and weights (no copy), a KV cache, prefill and
incremental decode, for every layout the trainer supports.

Replicas. The DP x CP ranks of a layout are independent replicas (CP ranks too: generation switches ring attention
and sequence parallelism off for its calls, so each CP rank attends over its own sequences); each serves every n-th
request (`replica_share`). A replica is a TP x PP slice of the world: all its ranks run every forward call together.

One generation batch on a replica:
- prefill: one call per prompt length, for the prompts of that length together (no padding is computed: prompts
  of other lengths are other calls), filling their cache rows; the last position's logits give the first tokens;
- decode: one call per step for every row still running (its last token at its own position; the cache mask hides
  the other rows' longer histories), until each row has drawn the end-of-document token or its `max_new_tokens`.
Pipeline parallelism: each call walks the stages in order, the hidden states [s, b, h] going from stage to stage
point to point (their shape changes from prefill to decode; every rank of the replica knows it); the last stage draws
the tokens and broadcasts them, with their log-probabilities, over the pipeline group, so the first stage can feed
them back. Tokens are drawn from the logits gathered over TP, identically on every TP rank (`sampling`).
MoE: when experts are spread over ranks of different replicas (EP, ETP), all replicas run the same calls in
lockstep: one that has no prompt left to prefill, or whose rows have all finished, runs an empty call (one token,
no cache) until an all-reduce over the replicas says every replica is done. Dense models skip the empty calls and
only take part in that all-reduce.

The routing record of an MoE model (`record_routing`): for each sequence, the experts [tokens, MoE layers, k] chosen
for the tokens the model read, prompt[0:] + response[:-1] (the last drawn token is never fed back).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megalite import comm
from megalite.engine.setup import Run
from megalite.inference.kv_cache import CacheStep, KVCache
from megalite.inference.sampling import Draw, SamplingParams, draw, sample_generator
from megalite.tensor_parallel.mappings import gather_from_tensor_parallel_region

Progress = Callable[[int], None]
"""Called with the number of tokens just generated on this replica."""


@dataclass(frozen=True)
class Request:
    """One sequence to generate: a prompt's tokens, the most new tokens, and its key (prompt id, sample index)."""

    prompt: list[int]
    max_new_tokens: int
    prompt_id: int = 0
    sample_index: int = 0


@dataclass
class Completion:
    """What was generated for one request."""

    prompt_id: int
    sample_index: int
    prompt: list[int]
    tokens: list[int]
    """The new tokens, the end-of-document token included when it ended the sequence."""
    logprobs: list[float]
    """Of each new token under the model (before temperature, top-k, top-p)."""
    sampling_logprobs: list[float]
    """Of each new token under the distribution it was drawn from."""
    finish_reason: str
    """'eod' or 'length'."""
    routed_experts: torch.Tensor | None = None
    """[len(prompt) + len(tokens) - 1, MoE layers, k] with `record_routing`, else None."""


@contextlib.contextmanager
def generation_mode(run: Run) -> Iterator[None]:
    """Eval mode, no autograd, and the context's knobs for generation (no sequence parallelism, no ring
    attention); the model's mode and knobs are restored afterwards."""
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad(), run.context.using(sequence_parallel=False, context_parallel=False):
            yield
    finally:
        run.model.train(was_training)


class Generator:
    """Generation on this rank's replica (see the module docstring); every rank of the world calls `generate`
    with its replica's requests."""

    def __init__(self, run: Run, eod: int):
        self.run, self.eod = run, eod
        cfg, groups = run.config.model, run.groups
        schedule = run.schedule()
        self.stages = [schedule.location(s) for s in range(schedule.num_stages)]
        self.pp_rank, self.pp_ranks = groups.rank("pp"), groups.ranks["pp"]
        self.moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)] if cfg.num_experts else []
        self.topk = cfg.moe_router_topk
        self.replicas = groups.size("dp_cp")
        self.lockstep = bool(self.moe_layers) and self.replicas > 1
        self.kv_layers = {layer.attention.layer: (layer.attention.num_groups, layer.attention.head_dim)
                          for chunk in run.chunks for layer in chunk.layers.values()}

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.stages[-1][0]

    # ------------------------------------------------------------------------------------------------ replicas
    def max_over_replicas(self, n: int) -> int:
        """The largest `n` of all replicas."""
        if self.replicas == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.run.device)
        comm.all_reduce(t, self.run.groups.dp_cp, op=dist.ReduceOp.MAX)
        return int(t.item())

    # -------------------------------------------------------------------------------------------------- calls
    def _through_stages(self, tokens: torch.Tensor, positions: torch.Tensor, step: CacheStep | None
                        ) -> torch.Tensor | None:
        """One forward call through every stage; the last stage's rank gets the logits [b, s, v/t]."""
        b, s = tokens.shape
        hidden = None
        for stage, (rank, chunk) in enumerate(self.stages):
            if stage > 0 and self.stages[stage - 1][0] != rank:
                prev = self.stages[stage - 1][0]
                if self.pp_rank == prev:
                    comm.wait_all(comm.batch_isend_irecv([(hidden, self.pp_ranks[rank])], [], self.run.groups.pp),
                                  self.run.groups.pp)
                elif self.pp_rank == rank:
                    hidden = torch.empty((s, b, self.run.config.model.hidden_size), dtype=self.run.dtype,
                                         device=self.run.device)
                    comm.wait_all(comm.batch_isend_irecv([], [(hidden, self.pp_ranks[prev])], self.run.groups.pp),
                                  self.run.groups.pp)
            if self.pp_rank == rank:
                hidden = self.run.chunks[chunk](tokens if stage == 0 else None, positions, hidden, cache=step)
        return hidden if self.is_last_stage else None

    def _empty_call(self) -> None:
        """A call that keeps this replica in step with the others (lockstep): one token, no cache."""
        one = torch.full((1, 1), self.eod, dtype=torch.int64, device=self.run.device)
        self._through_stages(one, torch.zeros_like(one), None)

    def _draw(self, logits: torch.Tensor | None, b: int, params: SamplingParams,
              generators: list[torch.Generator]) -> Draw:
        """Tokens from the last position's logits on the last stage, shared over the pipeline group."""
        packed = torch.empty((b, 3), dtype=torch.float64, device=self.run.device)
        if logits is not None:
            full = gather_from_tensor_parallel_region(logits[:, -1].contiguous(), self.run.groups.tp)
            d = draw(full, params, generators)
            packed = torch.stack([d.tokens.double(), d.logprobs.double(), d.sampling_logprobs.double()], dim=1)
        if len(self.pp_ranks) > 1:
            comm.broadcast(packed, self.pp_ranks[self.stages[-1][0]], self.run.groups.pp)
        return Draw(packed[:, 0].long(), packed[:, 1].float(), packed[:, 2].float())

    def _routing(self, record: dict[int, torch.Tensor], b: int, s: int) -> torch.Tensor:
        """[b, s, MoE layers, k] from a call's record: this stage's layers filled, the others -1."""
        out = torch.full((b, s, len(self.moe_layers), self.topk), -1, dtype=torch.int64, device=self.run.device)
        for j, layer in enumerate(self.moe_layers):
            if layer in record:
                out[:, :, j] = record[layer].transpose(0, 1)
        return out

    def _call(self, tokens: torch.Tensor, step: CacheStep, params: SamplingParams,
              generators: list[torch.Generator], record_routing: bool) -> tuple[Draw, torch.Tensor | None]:
        b, s = tokens.shape
        with self.run.context.recording_routing() if record_routing else contextlib.nullcontext() as record:
            logits = self._through_stages(tokens, step.positions(s), step)
        routing = self._routing(record, b, s) if record_routing else None
        return self._draw(logits, b, params, generators), routing

    # ------------------------------------------------------------------------------------------------ generate
    def generate(self, requests: list[Request], params: SamplingParams, record_routing: bool = False,
                 progress: Progress | None = None) -> list[Completion]:
        """Generate one batch: this replica's `requests` (possibly none, while other replicas have some)."""
        record_routing = record_routing and bool(self.moe_layers)
        for r in requests:
            if not r.prompt or r.max_new_tokens < 1:
                raise ValueError(f"prompt {r.prompt_id}: a request needs at least one prompt token and "
                                 f"max_new_tokens >= 1")
        device, batch = self.run.device, len(requests)
        capacity = max((len(r.prompt) + r.max_new_tokens for r in requests), default=1)
        cache = KVCache.allocate(self.kv_layers, max(batch, 1), capacity, self.run.dtype, device)
        generators = [sample_generator(params.seed, r.prompt_id, r.sample_index) for r in requests]
        out = [Completion(r.prompt_id, r.sample_index, list(r.prompt), [], [], [], "length") for r in requests]
        routes: list[list[torch.Tensor]] = [[] for _ in requests]
        done = [False] * batch

        def take(rows: list[int], d: Draw, routing: torch.Tensor | None) -> None:
            tokens, logprobs, sampling = d.tokens.tolist(), d.logprobs.tolist(), d.sampling_logprobs.tolist()
            for j, i in enumerate(rows):
                token = tokens[j]
                out[i].tokens.append(token)
                out[i].logprobs.append(logprobs[j])
                out[i].sampling_logprobs.append(sampling[j])
                if routing is not None:
                    routes[i].append(routing[j])
                if token == self.eod:
                    out[i].finish_reason, done[i] = "eod", True
                elif len(out[i].tokens) == requests[i].max_new_tokens:
                    done[i] = True
            if progress is not None:
                progress(len(rows))

        with generation_mode(self.run):
            by_length: dict[int, list[int]] = {}
            for i, r in enumerate(requests):
                by_length.setdefault(len(r.prompt), []).append(i)
            prefills = list(by_length.values())
            for c in range(self.max_over_replicas(len(prefills)) if self.lockstep else len(prefills)):
                if c >= len(prefills):
                    self._empty_call()
                    continue
                rows = prefills[c]
                prompts = torch.tensor([requests[i].prompt for i in rows], dtype=torch.int64, device=device)
                step = CacheStep(cache, [0] * len(rows), None if rows == list(range(batch)) else rows)
                take(rows, *self._call(prompts, step, params, [generators[i] for i in rows], record_routing))
            lengths = [len(r.prompt) for r in requests]  # tokens each cache row holds
            while True:
                active = [i for i in range(batch) if not done[i]]
                if self.max_over_replicas(int(bool(active))) == 0:
                    break
                if not active:
                    if self.lockstep:
                        self._empty_call()
                    continue
                last = torch.tensor([[out[i].tokens[-1]] for i in active], dtype=torch.int64, device=device)
                step = CacheStep(cache, [lengths[i] for i in active], None if len(active) == batch else active)
                take(active, *self._call(last, step, params, [generators[i] for i in active], record_routing))
                for i in active:
                    lengths[i] += 1
        if record_routing:
            self._attach_routing(out, routes)
        return out

    def _attach_routing(self, out: list[Completion], routes: list[list[torch.Tensor]]) -> None:
        """Each completion's routing record, the layers of every pipeline stage filled in (max over PP)."""
        per_row = [torch.cat(r) for r in routes]
        if not per_row:
            return
        flat = torch.cat(per_row)
        if len(self.pp_ranks) > 1:
            comm.all_reduce(flat, self.run.groups.pp, op=dist.ReduceOp.MAX)
        for c, r in zip(out, flat.split([len(r) for r in per_row])):
            c.routed_experts = r.cpu()


def replica_share(requests: list[Request], run: Run) -> list[Request]:
    """The requests this rank's replica (its DP x CP rank) serves: every n-th, n = DP x CP."""
    return requests[run.groups.rank("dp_cp")::run.groups.size("dp_cp")]


def generate(run: Run, requests: list[Request], params: SamplingParams, eod: int, *, batch_size: int = 16,
             record_routing: bool = False, progress: Progress | None = None) -> list[Completion]:
    """Every request's completion, on every rank, in request order: each replica generates its share in batches
    of `batch_size` (every replica runs as many batches as the busiest one), then the replicas exchange results."""
    if batch_size < 1:
        raise ValueError(f"the generation batch size must be >= 1, got {batch_size}")
    generator = Generator(run, eod)
    mine = replica_share(requests, run)
    batches = generator.max_over_replicas(-(-len(mine) // batch_size))
    done: list[Completion] = []
    for i in range(batches):
        done += generator.generate(mine[i * batch_size:(i + 1) * batch_size], params, record_routing, progress)
    if generator.replicas > 1:
        gathered: list[list[Completion] | None] = [None] * generator.replicas
        dist.all_gather_object(gathered, done, group=run.groups.dp_cp)
        done = [c for part in gathered for c in part]
    order = {(r.prompt_id, r.sample_index): i for i, r in enumerate(requests)}
    return sorted(done, key=lambda c: order[(c.prompt_id, c.sample_index)])
