"""The step engine: overlapped gradient reduction under every schedule, losses that read extra fields or reduce a
per-sequence statistic over CP, forward-only passes on frozen models, and two models in one process."""
import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.context_parallel import zigzag_unshard
from megalite.engine.losses import CrossEntropyLoss, LossOutput
from megalite.engine.setup import setup
from megalite.engine.step import forward_backward, forward_only, optimizer_step
from megalite.tensor_parallel import gather_full, get_spec, vocab_parallel_log_probs
from megalite.tensor_parallel.mappings import sum_over_group
from megalite.testing import run_distributed
from megalite.testing.reference import SyntheticDataset, assert_matches_single_process, reference_argv
from megalite.training import global_batch

MODEL = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "64", "--seq-length", "16", "--vocab-size", "128", "--global-batch-size", "8",
         "--lr", "0.01", "--swiglu", "--disable-bias-linear", "--adam-eps", "1e-4"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--moe-aux-loss-coeff", "0.01"]


# ----------------------------------------------------------------------------------- losses beyond cross entropy
class WeightedTokenLoss:
    """Cross entropy weighted by a per-token field and a per-sample field: reads what the batch carries besides
    the tokens (as RL losses read advantages)."""

    def normalizer(self, batch, groups):
        return batch["loss_mask"].sum()

    def __call__(self, logits, batch, groups):
        ce = CrossEntropyLoss().per_token(logits, batch, groups)
        weight = batch["token_weight"] * (1.0 + 0.5 * batch["sample_weight"]).unsqueeze(1)
        return LossOutput((ce * weight * batch["loss_mask"]).sum(), {"weight": (weight * batch["loss_mask"]).sum()})


class SequenceStatisticLoss:
    """Per sequence, m = mean over its loss tokens (all CP shards) of the cross entropy; the loss is the mean over
    sequences of w m^2, non-linear in m, so a statistic not reduced over CP would change it (as GSPO's
    sequence-level ratio)."""

    def normalizer(self, batch, groups):
        return torch.tensor(batch["tokens"].shape[0] / groups.size("cp"))

    def __call__(self, logits, batch, groups):
        ce = CrossEntropyLoss().per_token(logits, batch, groups)
        mask = batch["loss_mask"]
        tokens = mask.sum(1)
        if groups.size("cp") > 1:
            tokens = tokens.clone()
            dist.all_reduce(tokens, group=groups.cp)
        mean = sum_over_group((ce * mask).sum(1), groups.cp) / tokens.clamp_min(1.0)
        return LossOutput((batch["sample_weight"] * mean.square()).sum() / groups.size("cp"))


class UnreducedSequenceStatisticLoss(SequenceStatisticLoss):
    """The same loss with the per-sequence mean taken over this CP rank's tokens only: wrong under CP."""

    def __call__(self, logits, batch, groups):
        ce = CrossEntropyLoss().per_token(logits, batch, groups)
        mean = (ce * batch["loss_mask"]).sum(1) / batch["loss_mask"].sum(1).clamp_min(1.0)
        return LossOutput((batch["sample_weight"] * mean.square()).sum() / groups.size("cp"))


LOSS_LAYOUTS = {
    "tp2_sp_cp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
                       "--micro-batch-size", "4"], None),
    "pp2_1f1b_ep2_moe": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                             "--micro-batch-size", "2", *MOE], 2),
    "pp2_zb-v_cp2": (4, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-v",
                         "--context-parallel-size", "2", "--micro-batch-size", "2"], None),
}


@pytest.mark.parametrize("loss", [WeightedTokenLoss(), SequenceStatisticLoss()], ids=["per_token_field", "per_seq_cp"])
@pytest.mark.parametrize("layout", sorted(LOSS_LAYOUTS))
def test_a_loss_with_extra_fields_matches_single_process(layout, loss, world_of_one):
    world, flags, reference_mbs = LOSS_LAYOUTS[layout]
    assert_matches_single_process(world, MODEL + flags, micro_batch_size=reference_mbs, loss=loss)


def test_the_sequence_statistic_needs_its_cp_reduction(world_of_one):
    """Mutation check: without the sum over CP the per-sequence loss no longer matches one process."""
    with pytest.raises(AssertionError):
        assert_matches_single_process(4, MODEL + LOSS_LAYOUTS["tp2_sp_cp2"][1], loss=UnreducedSequenceStatisticLoss())


def _step_metrics(argv):
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived)
    result = forward_backward(run, global_batch(run, SyntheticDataset(128, 16, 8, extras=True), 0),
                              WeightedTokenLoss())
    ps.destroy_model_parallel(run.groups)
    return result.loss, result.metrics, run.logs


def test_metrics_are_normalised_and_reduced_like_the_loss(world_of_one):
    argv = MODEL + LOSS_LAYOUTS["tp2_sp_cp2"][1]
    results = run_distributed(4, _step_metrics, argv)
    loss, metrics, _ = next(r for r in results if r[2])
    ref_loss, ref_metrics, _ = _step_metrics(reference_argv(argv))
    assert metrics.keys() == {"weight"} and ref_metrics["weight"] > 0.5
    assert metrics["weight"] == pytest.approx(ref_metrics["weight"], rel=1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5)


# ------------------------------------------------------------------------------- overlapped gradient reduction
OVERLAP = {
    "none": ["--micro-batch-size", "2"],
    "1f1b": ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"],
    "interleaved": ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", "--pipeline-schedule",
                    "interleaved", "--num-layers-per-virtual-pipeline-stage", "1"],
    "zb-v": ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", "--pipeline-schedule", "zb-v"],
}


def _step_with_and_without_overlap(argv):
    """Two steps without and with --overlap-grad-reduce on the same data; the params, losses and, for the second
    overlapped step, when the first bucket reduction started relative to the last compute action."""
    out = {}
    for overlap in (False, True):
        config, derived = resolve(parse_args(argv + (["--overlap-grad-reduce"] if overlap else [])),
                                  dist.get_world_size())
        run = setup(config, derived)
        data = SyntheticDataset(128, 16, 2 * derived.global_batch_size)
        losses = []
        for step in range(2):
            run.reducer.zero_grad()
            result = forward_backward(run, global_batch(run, data, step * derived.global_batch_size))
            losses.append(result.loss)
            first_start = min(run.reducer.start_times, default=float("inf")) - result.record.t0
            optimizer_step(run, 0.01)
        last = [(name, start, end) for name, start, end in result.record.events if name[0] in "BW"][-1]
        out[overlap] = dict(losses=losses, params=[p.detach().clone() for p in run.model.parameters()],
                            first_start=first_start, last_action=last)
        ps.destroy_model_parallel(run.groups)
    return out


@pytest.mark.parametrize("schedule", sorted(OVERLAP))
def test_overlapped_reduction_equals_the_plain_one_and_starts_before_the_last_backward(schedule):
    """DP2 (x PP2): overlapping changes nothing in the result, and some bucket's reduction starts before the step's
    last B/W ends (schedule 'none', 1f1b: inside the last backward), or before it starts (interleaved and zb-v:
    a chunk whose backward is complete reduces while the other chunk still computes)."""
    argv = MODEL + ["--ddp-bucket-size", "2000"] + OVERLAP[schedule]
    for rank_result in run_distributed(2 if schedule == "none" else 4, _step_with_and_without_overlap, argv):
        plain, overlapped = rank_result[False], rank_result[True]
        assert plain["losses"] == overlapped["losses"]
        assert all(torch.equal(a, b) for a, b in zip(plain["params"], overlapped["params"]))
        assert plain["first_start"] > plain["last_action"][2]  # without overlap: after the step's compute
        name, start, end = overlapped["last_action"]
        bound = start if schedule in ("interleaved", "zb-v") else end
        assert overlapped["first_start"] < bound, (schedule, overlapped["first_start"], name, start, end)


# -------------------------------------------------------------------------------------- forward-only, frozen
def _log_probs_of(argv):
    """Per-token log-probs of every microbatch from a frozen model (no reducer, no optimizer), as the last stage
    sees them, with this rank's CP coordinates."""
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived, trainable=False)
    assert run.reducer is None and run.optimizer is None
    batches = global_batch(run, SyntheticDataset(128, 16, derived.global_batch_size), 0)
    out = forward_only(run, batches, lambda logits, b: vocab_parallel_log_probs(logits, b["labels"], run.groups.tp))
    where = dict(cp=run.groups.rank("cp"), dp=run.groups.rank("dp"), tp=run.groups.rank("tp"))
    ps.destroy_model_parallel(run.groups)
    return out, where


def test_forward_only_log_probs_of_a_frozen_model_match_single_process(world_of_one):
    argv = MODEL + ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-v", "--context-parallel-size",
                    "2", "--micro-batch-size", "2"]
    results = run_distributed(4, _log_probs_of, argv)
    (ref,), _ = _log_probs_of(reference_argv(argv))  # one microbatch of the whole global batch
    holders = [(out, where) for out, where in results if out is not None]
    assert len(holders) == 2  # rank 0 holds zb-v's last stage, for both CP ranks
    shards = [torch.cat(out) for out, where in sorted(holders, key=lambda h: h[1]["cp"])]
    torch.testing.assert_close(zigzag_unshard(shards, dim=1), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- two models in one process
POLICY = MODEL + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size", "4",
                  "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
REFERENCE = ["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4", "--seq-length", "16",
             "--vocab-size", "128", "--global-batch-size", "8", "--micro-batch-size", "2", "--hidden-dropout", "0.2",
             "--seed", "7", "--context-parallel-size", "2"]


def _policy_and_reference(which):
    """Train the policy for 3 steps and/or run the (frozen, dropout on, training mode) reference forward-only
    before each of them; each model in its own layout of the same 2 ranks."""
    runs = {}
    for name, argv, trainable in (("policy", POLICY, True), ("reference", REFERENCE, False)):
        if name in which:
            config, derived = resolve(parse_args(argv), dist.get_world_size())
            runs[name] = (setup(config, derived, trainable=trainable), derived)
    data = SyntheticDataset(128, 16, 3 * 8)
    out = {"losses": [], "log_probs": []}
    for step in range(3):
        if "reference" in runs:
            ref, derived = runs["reference"]
            assert ref.model.training
            lp = forward_only(ref, global_batch(ref, data, 8 * step),
                              lambda logits, b: vocab_parallel_log_probs(logits, b["labels"], ref.groups.tp))
            out["log_probs"].append(lp)
        if "policy" in runs:
            run, derived = runs["policy"]
            run.reducer.zero_grad()
            out["losses"].append(forward_backward(run, global_batch(run, data, 8 * step)).loss)
            optimizer_step(run, 0.01)
    if "policy" in runs:
        run = runs["policy"][0]
        out["params"] = {n: gather_full(p.detach(), get_spec(p), getattr(run.groups, get_spec(p).group))
                         for n, p in run.model.named_parameters()}
    for run, _ in runs.values():
        ps.destroy_model_parallel(run.groups)
    return out


def test_two_models_in_one_process_each_give_what_they_give_alone():
    """A trained TP2+SP policy and a frozen CP2 reference of another shape, both with dropout in training mode,
    interleaved in one process: bit-identical to each run alone."""
    together = run_distributed(2, _policy_and_reference, ("policy", "reference"))
    policy = run_distributed(2, _policy_and_reference, ("policy",))
    reference = run_distributed(2, _policy_and_reference, ("reference",))
    for rank in range(2):
        assert together[rank]["losses"] == policy[rank]["losses"]
        assert together[rank]["params"].keys() == policy[rank]["params"].keys()
        assert all(torch.equal(v, policy[rank]["params"][k]) for k, v in together[rank]["params"].items())
        for got, want in zip(together[rank]["log_probs"], reference[rank]["log_probs"]):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    # dropout is on: the reference's three passes over different data are not trivially equal
    assert not torch.equal(reference[0]["log_probs"][0][0], reference[0]["log_probs"][1][0])
