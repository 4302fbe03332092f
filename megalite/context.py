"""What the layers of one model share at run time, owned by that model: `ModelContext`.

Every layer of a model (all of its pipeline chunks on this rank) is given the same context when it is built, and
reads from it in forward and backward; nothing of this lives in the process. Two models in one process (a policy
and its frozen reference) have two contexts and cannot disturb each other. A context holds:
- `knobs`: the parallel code paths (sequence parallelism, ring attention) as configured; a caller may switch them
  for one forward call (`using`), e.g. generation turns both off for decode steps;
- `rng`: the model's dropout streams (`RNGTracker`);
- `aux_losses`: the MoE aux-loss gradient scale of the current step and the values logged for the log line;
- the weight-gradient queue of a split backward (`deferring_weight_grads`), which the pipeline's W pass runs;
- whether activation recomputation is running (`recomputing`), so that side effects are not counted twice;
- the routing record of a forward call (`recording_routing`): the experts each token was sent to, per MoE layer;
- the gradient sink of a trained model (`grad_sink`), into which linear layers accumulate weight gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from megalite.tensor_parallel.random import RNGTracker

WeightGradWork = Callable[[], list[tuple[torch.nn.Parameter, torch.Tensor]]]
"""A deferred weight-gradient computation: returns (parameter, gradient) pairs to accumulate."""
GradSink = Callable[[torch.nn.Parameter, Callable[[torch.Tensor], None]], bool]
"""`sink(p, write)`: `write(main_grad)` adds a weight gradient of `p` into its fp32 main gradient; False (nothing
written) where `p`'s gradient must take the autograd path."""


@dataclass(frozen=True)
class ParallelKnobs:
    """Switches of the parallel code paths; the model is built with one set, a forward call may use another."""

    sequence_parallel: bool = False
    """Activations outside attention and MLP split along the sequence over TP (no effect with TP = 1)."""
    context_parallel: bool = True
    """Attention over the CP group (ring attention on zigzag shards). False: each CP rank attends over its own
    tokens only, as an independent replica (generation)."""
    cp_comm_type: str = "p2p"
    """How ring attention exchanges K/V: 'p2p' or 'all_gather'."""


@dataclass
class AuxLosses:
    """MoE aux losses of one model: the gradient scale they get (set per step) and their values for the log."""

    scale: float = 1.0
    """The factor each microbatch's LM loss gets, applied to the aux-loss gradients too."""
    logged: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def record(self, name: str, value: torch.Tensor) -> None:
        """Keep one microbatch's value of a logged loss (detached; converted to a float only when popped)."""
        self.logged.setdefault(name, []).append(value.detach())

    def pop(self) -> dict[str, float]:
        """Each logged loss (e.g. 'load_balancing_loss/layer0') averaged over the microbatches since the last pop."""
        means = {name: torch.stack(values).mean().item() for name, values in self.logged.items()}
        self.logged.clear()
        return means


class ModelContext:
    """The run-time state shared by the layers of one model (see the module docstring)."""

    def __init__(self, knobs: ParallelKnobs = ParallelKnobs(), rng: RNGTracker | None = None):
        self.knobs = knobs
        self.rng = rng if rng is not None else RNGTracker.seeded(0)
        self.aux_losses = AuxLosses()
        self.weight_grad_queue: list[WeightGradWork] | None = None
        """While not None, linear layers' backward appends their weight-gradient work here instead of doing it."""
        self.recomputing = False
        """True while activation recomputation replays a forward inside the backward pass."""
        self.grad_sink: GradSink | None = None
        """Set by a trained model's gradient reducer: linear layers write fp32 weight gradients straight into the
        parameter's main gradient through it (gradient-accumulation fusion; see `GradReducer.accumulate_in_place`)."""
        self.routing_record: dict[int, torch.Tensor] | None = None
        """While not None, each MoE layer stores here, under its global layer index, the experts [s, b, k] chosen
        for every token of the forward call's input on this rank (gathered over TP)."""

    @contextlib.contextmanager
    def using(self, knobs: ParallelKnobs | None = None, **changes: object) -> Iterator[ParallelKnobs]:
        """Run the block with other knobs (`knobs`, or the current ones with `changes`); restored afterwards."""
        previous = self.knobs
        self.knobs = dataclasses.replace(knobs or previous, **changes)
        try:
            yield self.knobs
        finally:
            self.knobs = previous

    @contextlib.contextmanager
    def deferring_weight_grads(self) -> Iterator[list[WeightGradWork]]:
        """Inside the block, linear layers' backward queues their weight-gradient work (the W pass runs it)."""
        previous, queue = self.weight_grad_queue, []
        self.weight_grad_queue = queue
        try:
            yield queue
        finally:
            self.weight_grad_queue = previous

    @contextlib.contextmanager
    def recording_routing(self) -> Iterator[dict[int, torch.Tensor]]:
        """Inside the block, MoE layers record the experts each token is routed to (see `routing_record`)."""
        previous, record = self.routing_record, {}
        self.routing_record = record
        try:
            yield record
        finally:
            self.routing_record = previous

    @contextlib.contextmanager
    def replaying(self, rng_states: dict[str, torch.Tensor]) -> Iterator[None]:
        """Activation recomputation: draw from the dropout states the original forward started with, and mark the
        block as a recomputation."""
        current, was = self.rng.state_dict(), self.recomputing
        self.rng.load_state_dict(rng_states)
        self.recomputing = True
        try:
            yield
        finally:
            self.rng.load_state_dict(current)
            self.recomputing = was
