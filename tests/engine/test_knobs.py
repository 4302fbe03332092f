"""Parallel knobs set per forward call: a model built with sequence parallelism runs a call without it, and a CP
model's ranks run a call as independent replicas (generation needs both); the logits equal one process's."""
import torch
import torch.distributed as dist

from megalite import comm
from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.context import ParallelKnobs
from megalite.engine.setup import setup
from megalite.testing import run_distributed
from megalite.testing.reference import SyntheticDataset, reference_argv

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "64", "--seq-length", "16", "--vocab-size", "128", "--swiglu", "--micro-batch-size", "2",
         "--global-batch-size", "2"]


def _tokens(sample: int) -> torch.Tensor:
    return SyntheticDataset(128, 16, 8)[sample]["tokens"].unsqueeze(0)


def _logits(argv: list[str], sample_of_rank: bool, **knobs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full-vocabulary logits of one whole sequence (sample = this rank's CP rank if `sample_of_rank`, else 0):
    with the model's own knobs where they apply (None when CP shards the sequence), and with `knobs` changed."""
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived, trainable=False)
    model, groups = run.chunks[0], run.groups
    model.eval()
    tokens = _tokens(groups.rank("cp") if sample_of_rank else 0)

    def full(logits: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(logits) for _ in range(groups.size("tp"))]
        dist.all_gather(parts, logits.contiguous(), group=groups.tp)
        return torch.cat(parts, dim=-1)

    with torch.no_grad(), comm.count_comm() as own_comm:
        own = model(tokens) if groups.size("cp") == 1 else None
    with torch.no_grad(), comm.count_comm() as changed_comm:
        changed = model(tokens, knobs=ParallelKnobs(**{**vars(run.context.knobs), **knobs}))
    assert run.context.knobs.sequence_parallel == config.parallel.sequence_parallel  # restored after the call
    scattered = [c.total("reduce_scatter", "tp") > 0 for c in (own_comm, changed_comm)]
    own, changed = full(own) if own is not None else None, full(changed)
    ps.destroy_model_parallel(groups)
    return own, changed, scattered


def test_sequence_parallelism_switched_off_for_one_call_gives_the_same_logits(world_of_one):
    argv = MODEL + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    (ref, _, _) = _logits(reference_argv(argv), False)
    for own, without_sp, scattered in run_distributed(2, _logits, argv, False, sequence_parallel=False):
        assert scattered == [True, False]  # the call really ran without sequence parallelism
        torch.testing.assert_close(own, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(without_sp, ref, rtol=1e-5, atol=1e-5)


def test_cp_ranks_serve_their_own_sequences_with_ring_attention_off(world_of_one):
    argv = MODEL + ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    results = run_distributed(4, _logits, argv, True, context_parallel=False, sequence_parallel=False)
    for rank, (_, logits, _) in enumerate(results):
        cp_rank = rank // 2  # order tp-cp-ep-dp-pp
        config, derived = resolve(parse_args(reference_argv(argv)), 1)
        run = setup(config, derived, trainable=False)
        run.chunks[0].eval()
        with torch.no_grad():
            want = run.chunks[0](_tokens(cp_rank))
        ps.destroy_model_parallel(run.groups)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
