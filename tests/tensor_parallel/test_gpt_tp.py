"""The GPT model under TP in {2, 4} x SP x MHA/GQA x tied/untied equals the single-process model:
same loss and same gathered gradients in fp32 (relative error under 1e-5)."""
import itertools

import pytest
import torch

from megalite import parallel_state as ps
from megalite.config import ModelConfig
from megalite.context import ModelContext, ParallelKnobs
from megalite.models.gpt import GPTModel
from megalite.optim.ddp import GradReducer
from megalite.tensor_parallel import RNGTracker, gather_full, get_spec, vocab_parallel_cross_entropy
from megalite.testing import run_distributed

VOCAB, SEQ, BATCH, SEED = 128, 8, 2, 7


def model_config(gqa: bool, tied: bool, **overrides) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=64, num_attention_heads=8, vocab_size=VOCAB,
                       num_query_groups=4 if gqa else None, seq_length=SEQ,
                       untie_embeddings_and_output_weights=not tied, **overrides)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def loss_and_grads(cfg: ModelConfig, tp: int, sp: bool, split_backward: bool = False,
                   **model_kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    """Run one forward/backward on this rank's model (with `split_backward`, the weight gradients deferred to a W
    pass afterwards, as zero-bubble schedules do); return the loss and every full (gathered) gradient."""
    groups = ps.initialize_model_parallel(tp=tp)
    context = ModelContext(ParallelKnobs(sequence_parallel=sp), RNGTracker.seeded(SEED, groups.rank("tp")))
    model = GPTModel(cfg, groups, context, **model_kwargs)
    model.initialize(SEED)
    reducer = GradReducer(list(model.parameters()), groups)
    tokens, labels, mask = batch()
    losses = vocab_parallel_cross_entropy(model(tokens), labels, groups.tp)
    loss = (losses * mask).sum() / mask.sum()
    if split_backward:
        with context.deferring_weight_grads() as weight_work:
            loss.backward()
        for work in weight_work:
            for param, grad in work():
                reducer.add_deferred(param, grad)
    else:
        loss.backward()
    reducer.finish()
    grads = {n: gather_full(p.main_grad, get_spec(p), groups.tp) for n, p in model.named_parameters()}
    ps.destroy_model_parallel(groups)
    return loss.item(), grads


CASES = list(itertools.product([False, True], [False, True], [False, True]))  # sp, gqa, tied


def _all_cases(tp):
    return [loss_and_grads(model_config(gqa, tied), tp, sp) for sp, gqa, tied in CASES]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_sp_gqa_tied_match_single_process(tp, world_of_one):
    results = run_distributed(tp, _all_cases, tp)
    for i, (sp, gqa, tied) in enumerate(CASES):
        ref_loss, ref_grads = loss_and_grads(model_config(gqa, tied), 1, False)
        for rank in range(tp):
            loss, grads = results[rank][i]
            assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5, (sp, gqa, tied, rank)
            assert grads.keys() == ref_grads.keys()
            for name, g in grads.items():
                assert _rel(g, ref_grads[name]) < 1e-5, (sp, gqa, tied, rank, name)


def _loss_and_grads_with_recompute(granularity):
    return loss_and_grads(model_config(gqa=True, tied=True, recompute_granularity=granularity,
                                       hidden_dropout=0.1, attention_dropout=0.1), 2, True)


def test_full_and_selective_recompute_give_the_same_loss_and_gradients_with_dropout():
    """Recomputation replays the same random draws (dropout on): identical loss and gradients on TP=2 + SP."""
    plain, full, selective = (run_distributed(2, _loss_and_grads_with_recompute, g) for g in (None, "full",
                                                                                              "selective"))
    for rank in range(2):
        for other in (full, selective):
            assert other[rank][0] == plain[rank][0]
            for name, g in plain[rank][1].items():
                assert torch.equal(other[rank][1][name], g), name


def _split_and_plain_backward(granularity):
    cfg = model_config(gqa=True, tied=True, recompute_granularity=granularity, hidden_dropout=0.1)
    return loss_and_grads(cfg, 2, True), loss_and_grads(cfg, 2, True, split_backward=True)


@pytest.mark.parametrize("granularity", [None, "full", "selective"])
def test_split_backward_gives_the_same_gradients_with_and_without_recompute(granularity):
    """The zero-bubble W pass must reach the parameters themselves: under recomputation autograd hands the
    backward detached copies of the saved weights (a gradient accumulated into one would be lost)."""
    for (loss, grads), (split_loss, split_grads) in run_distributed(2, _split_and_plain_backward, granularity):
        assert split_loss == loss
        for name, g in grads.items():
            assert torch.equal(split_grads[name], g), name
