"""The RL loss functions against direct computations (formulas written out element by element), and `PolicyLoss` on
the step engine: its value and normaliser per aggregation mode by hand on one process, and one training step of GRPO
and of GSPO + KL + entropy under TP+SP+CP and PP equal to one process (losses and parameters)."""
import math
from dataclasses import dataclass

import pytest
import torch

from megalite.rl.losses import (
    PolicyLoss,
    clipped_policy_loss,
    group_advantages,
    gspo_token_ratio,
    kl_estimate,
    token_ratio,
)
from megalite.testing.reference import assert_matches_single_process


def test_kl_estimators_match_their_formulas_and_k3_estimates_the_kl():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(50, generator=g) * 3, -torch.rand(50, generator=g) * 3
    for i in range(50):
        a, b = logp[i].item(), ref[i].item()
        r = math.exp(b - a)
        assert kl_estimate(logp[i], ref[i], "k1").item() == pytest.approx(a - b, abs=1e-6)
        assert kl_estimate(logp[i], ref[i], "k2").item() == pytest.approx(0.5 * (math.log(r)) ** 2, abs=1e-6)
        assert kl_estimate(logp[i], ref[i], "k3").item() == pytest.approx(r - 1 - math.log(r), abs=1e-6)
    p, q = torch.softmax(torch.randn(6, generator=g), 0), torch.softmax(torch.randn(6, generator=g), 0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum().item()
    for estimator in ("k1", "k3"):  # unbiased: the sample mean is the KL
        mean = kl_estimate(p.log()[samples], q.log()[samples], estimator).mean().item()
        assert mean == pytest.approx(exact, abs=0.01)


def test_clipped_policy_loss_element_by_element():
    g = torch.Generator().manual_seed(1)
    ratio, adv = torch.rand(200, generator=g) * 2, torch.randn(200, generator=g)
    loss, below, above = clipped_policy_loss(ratio, adv, 0.2, 0.28, dual_clip=3.0)
    for r, a, l, lo, hi in zip(ratio.tolist(), adv.tolist(), loss.tolist(), below.tolist(), above.tolist()):
        want = max(-a * r, -a * min(max(r, 0.8), 1.28))
        if a < 0:
            want = min(want, -3.0 * a)
        assert l == pytest.approx(want, abs=1e-6)
        assert lo == float(a < 0 and r < 0.8) and hi == float(a > 0 and r > 1.28)
    assert torch.equal(token_ratio(torch.tensor([-1.0]), torch.tensor([-1.5])), torch.exp(torch.tensor([0.5])))


def test_gspo_token_ratio_has_the_sequence_level_value_and_gradient():
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(7, generator=g)).requires_grad_()
    old, adv = -torch.rand(7, generator=g), 0.7
    mean = (logp - old).mean()
    ratio = gspo_token_ratio(logp, mean.expand(7))
    torch.testing.assert_close(ratio.detach(), torch.exp(mean.detach()).expand(7))
    (-adv * ratio).mean().backward()
    token_grad = logp.grad.clone()
    logp.grad = None
    (-adv * torch.exp((logp - old).mean())).backward()  # sequence-level GSPO: s_i as one function of the tokens
    torch.testing.assert_close(token_grad, logp.grad)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, 1e-6)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std(unbiased=True).item()  # sqrt(1/3): the unbiased std
    assert adv[:4].tolist() == pytest.approx([x / (std + 1e-6) for x in (0.5, -0.5, -0.5, 0.5)], abs=1e-6)
    assert adv[4:].abs().max() == 0  # equal rewards: no signal
    assert group_advantages(rewards, 4, 1e-6, std_normalize=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages(rewards, 1, 1e-6).abs().max() == 0  # groups of one: masked


def batch_and_logits(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    b, s, v = 2, 8, 11
    logits = torch.randn(b, s, v, generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    logp = torch.log_softmax(logits, -1).gather(2, labels.unsqueeze(2)).squeeze(2)
    batch = {"labels": labels, "loss_mask": mask, "document_ids": docs,
             "old_logprobs": logp + 0.3 * torch.randn(b, s, generator=g),
             "ref_logprobs": logp + 0.3 * torch.randn(b, s, generator=g),
             "advantages": torch.randn(b, 3, generator=g).gather(1, docs)}
    return logits, batch, logp


@pytest.mark.parametrize("gspo", [False, True], ids=["grpo", "gspo"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_policy_loss_on_one_process_by_hand(solo_groups, gspo, aggregation):
    logits, batch, logp = batch_and_logits()
    loss = PolicyLoss(0.2, 0.28, dual_clip=3.0, gspo=gspo, kl_beta=0.1, kl_estimator="k3", entropy_coeff=0.01,
                      aggregation=aggregation)
    out = loss(logits, batch, solo_groups)
    norm = loss.normalizer(batch, solo_groups)
    probs = torch.softmax(logits, -1)
    entropy = -(probs * probs.log()).sum(-1)
    total, sequences = 0.0, 0
    for row in range(2):
        for doc in batch["document_ids"][row].unique().tolist():
            idx = [t for t in range(8) if batch["document_ids"][row, t] == doc and batch["loss_mask"][row, t] > 0]
            if not idx:
                continue
            sequences += 1
            lp, old, ref = (batch[k][row, idx] if k != "lp" else logp[row, idx] for k in ("lp", "old_logprobs",
                                                                                          "ref_logprobs"))
            adv = batch["advantages"][row, idx]
            ratio = torch.exp((lp - old).mean()).expand(len(idx)) if gspo else torch.exp(lp - old)
            terms = []
            for r, a, p, q, e in zip(ratio.tolist(), adv.tolist(), lp.tolist(), ref.tolist(),
                                     entropy[row, idx].tolist()):
                pg = max(-a * r, -a * min(max(r, 0.8), 1.28))
                pg = min(pg, -3.0 * a) if a < 0 else pg
                terms.append(pg + 0.1 * (math.exp(q - p) - (q - p) - 1) - 0.01 * e)
            total += sum(terms) / (len(idx) if aggregation == "seq-mean-token-mean" else 1)
    want_norm = batch["loss_mask"].sum().item() if aggregation == "token-mean" else sequences
    assert norm.item() == pytest.approx(want_norm, abs=1e-5)
    assert out.value.item() == pytest.approx(total, rel=1e-5)


@dataclass
class SyntheticRL(PolicyLoss):
    """PolicyLoss on the synthetic dataset's extra fields: old log-probs near the model's (ratios around 1, some
    clipped), the reference's further away, one advantage per sample (asserted non-zero)."""

    def normalizer(self, batch, groups):
        return super().normalizer(self.fields(batch), groups)

    def __call__(self, logits, batch, groups):
        return super().__call__(logits, self.fields(batch), groups)

    @staticmethod
    def fields(batch):
        w = batch["token_weight"]
        advantages = batch["sample_weight"].unsqueeze(1).expand_as(w)
        assert advantages.abs().min() > 0
        return {**batch, "old_logprobs": -math.log(128) + 0.1 * (w - 1), "ref_logprobs": -math.log(128) + 0.3 * (w - 1),
                "advantages": advantages}


MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "48", "--swiglu", "--vocab-size", "128", "--seq-length", "16", "--global-batch-size", "4",
         "--lr", "1e-3", "--disable-bias-linear"]


@pytest.mark.parametrize("world, flags, loss", [
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
         "--micro-batch-size", "2"],
     SyntheticRL(3e-4, 4e-4, gspo=True, kl_beta=0.05, entropy_coeff=0.01, aggregation="seq-mean-token-mean")),
    (4, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"],
     SyntheticRL(0.05, 0.08, dual_clip=3.0, kl_beta=0.05, kl_estimator="k2", aggregation="token-mean")),
], ids=["gspo_tp2_sp_cp2", "grpo_pp2_dp2"])
def test_policy_loss_step_in_layouts_equals_one_process(world_of_one, world, flags, loss):
    assert_matches_single_process(world, MODEL + flags, steps=2, loss=loss)
