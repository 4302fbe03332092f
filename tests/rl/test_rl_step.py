"""The RL job end to end: one PPO step (seeded rollout on the training model, a user reward, group advantages, old and
reference log-probabilities, GRPO or GSPO training steps) gives the same rewards, losses and parameters under
TP2+SP+CP2, PP2 (zb-v) + DP2, PP2 (1F1B) + DP2 with the distributed optimizer and full recomputation, and an MoE model with EP2 and routing replay as on one process; on one process the
rollout's log-probabilities equal the old log-probabilities of the training forward (on-policy, fp32), the advantages
are not all zero, and `megalite rl` runs its PPO steps and logs them."""
import json
import re

import pytest
import torch

from megalite import cli
from megalite import parallel_state as ps
from megalite.rl.evaluate import evaluate
from megalite.rl.job import build_job
from megalite.rl.step import RLState, ppo_step
from megalite.tensor_parallel import gather_full, get_spec
from megalite.testing import run_distributed
from megalite.testing.reference import merged_params, reference_argv, relative_error


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{a} + {b} =", "label": a + b}) + "\n"
                                                for a in range(4) for b in range(4)))
    (root / "reward.py").write_text("def digits(prompt, response, label):\n"
                                    "    return sum(c.isdigit() for c in response) / max(len(response), 1)\n")
    return root


def argv_of(files, extra: list[str]) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--ffn-hidden-size", "48", "--swiglu", "--disable-bias-linear", "--seq-length", "32", "--seed", "3",
            "--data-path", str(files / "prompts.jsonl"), "--reward-fn", f"{files / 'reward.py'}:digits",
            "--ppo-auto-calc-args", "--ppo-step-per-epoch", "-1", "--train-iters", "-1",
            "--ppo-rollout-global-batch-size", "4", "--ppo-sampling-repeat", "4", "--ppo-sampling-keep", "4",
            "--global-batch-size", "8", "--ppo-resp-seq-len", "8", "--ppo-logps-fwd-micro-batch-size", "2",
            "--grpo-kl-loss-beta", "0.05", "--use-grpo", "--lr", "1e-3", *extra]


def one_ppo_step(argv: list[str]) -> dict:
    job, _, _ = build_job(argv)
    metrics = ppo_step(job, RLState())
    params = {name: gather_full(p.detach().float(), get_spec(p), getattr(job.run.groups, get_spec(p).group))
              for chunk in job.run.chunks for name, p in chunk.named_parameters()}
    logs = job.run.logs
    ps.destroy_model_parallel(job.run.groups)
    return {"metrics": metrics, "params": params, "logs": logs}


LAYOUTS = {
    "tp2_sp_cp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
                       "--micro-batch-size", "2"], []),
    "zbv_pp2_dp2": (4, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-v", "--micro-batch-size",
                        "2"], ["--num-layers", "4", "--use-gspo-loss", "--loss-agg-mode", "seq-mean-token-mean"]),
    "1f1b_pp2_dp2_distopt_recompute": (4, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "1f1b",
                                           "--use-distributed-optimizer", "--recompute-granularity", "full",
                                           "--micro-batch-size", "2"], ["--kl-estimator", "k2"]),
    "moe_ep2_replay": (2, ["--expert-model-parallel-size", "2", "--micro-batch-size", "2"],
                       ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
                        "--moe-aux-loss-coeff", "0", "--moe-router-replay"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_ppo_step_in_every_layout_equals_one_process(world_of_one, files, layout):
    world, parallel, model = LAYOUTS[layout]
    argv = argv_of(files, model + parallel)
    ref = one_ppo_step(reference_argv(argv, 2))
    assert ref["metrics"]["reward_std"] > 0  # non-zero advantages
    results = run_distributed(world, one_ppo_step, argv)
    for r in results:
        for key in ("reward_mean", "reward_std", "response_length_mean"):
            assert r["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-6)  # the same rollout
        if r["logs"]:  # the loss is reported where the log is written (the last stage's first rank)
            assert r["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-5, abs=1e-7)
    params = merged_params(results)
    for name, want in ref["params"].items():
        assert relative_error(params[name], want) < 1e-5, name


def test_on_policy_rollout_logprobs_equal_the_training_forward(world_of_one, files):
    job, _, _ = build_job(argv_of(files, ["--micro-batch-size", "2"]))
    before = [p.detach().clone() for p in job.run.model.parameters()]
    state = RLState()
    metrics = ppo_step(job, state)
    assert metrics["logprob_gap"] < 1e-5 and metrics["reward_std"] > 0
    assert state.ppo_step == 1 and state.iteration == 2 and state.prompts_consumed == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, job.run.model.parameters()))
    ps.destroy_model_parallel(job.run.groups)


def test_megalite_rl_runs_logs_each_ppo_step_and_evaluates(world_of_one, files, capsys):
    """4 PPO steps, an evaluation every 2 (and before the first): at PPO steps 0, 2 and 4."""
    held_out = ["--ppo-eval-data-path", str(files / "prompts.jsonl"), "--ppo-step-eval-interval", "2",
                "--ppo-eval-sampling-repeat", "2"]
    assert cli.main(["rl", *argv_of(files, ["--micro-batch-size", "4", *held_out])]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"\] +ppo step ", out)) == 4 and "reward" in out and "logprob gap" in out
    evals = re.findall(r"eval at ppo step (\d+) \| held-out reward ([0-9.]+) .* 4 prompts x 2 samples", out)
    assert [step for step, _ in evals] == ["0", "2", "4"]


def test_evaluation_is_repeatable_and_leaves_the_job_as_it_was(world_of_one, files):
    """The same model gives the same evaluation (the same prompts and random numbers), which neither trains nor
    moves the prompt stream; a greedy evaluation's samples of a prompt are all alike."""
    job, state, _ = build_job(argv_of(files, ["--ppo-eval-data-path", str(files / "prompts.jsonl"),
                                              "--ppo-eval-sampling-repeat", "3"]))
    before = [p.detach().clone() for p in job.run.model.parameters()]
    first = evaluate(job)
    assert evaluate(job) == first and 0 < first["eval/reward_mean"] < 1 and state == RLState()
    assert all(torch.equal(a, b) for a, b in zip(before, job.run.model.parameters()))
    job.rl.ppo_eval_temperature = 0.0  # greedy: a prompt's 3 samples are alike, so 1 sample scores the same
    greedy = evaluate(job)
    job.rl.ppo_eval_sampling_repeat = 1
    assert evaluate(job) == greedy != first
    ps.destroy_model_parallel(job.run.groups)


def test_resume_equals_the_uninterrupted_run(world_of_one, files, tmp_path):
    from megalite.checkpoint import read_logical_tensors
    from megalite.checkpoint.state import latest_iteration

    def run(save, extra):
        """2 PPO steps (--ppo-step-per-epoch 2), a checkpoint after each; no KL (a resumed KL run needs --load-ref)."""
        argv = argv_of(files, ["--micro-batch-size", "4"])
        argv.remove("--ppo-auto-calc-args")
        del argv[argv.index("--train-iters"):argv.index("--train-iters") + 2]
        argv[argv.index("--ppo-step-per-epoch") + 1] = "2"
        argv[argv.index("--grpo-kl-loss-beta") + 1] = "0"
        return cli.main(["rl", *argv, "--save", str(save), "--ppo-step-save-interval", "1", *extra])

    assert run(tmp_path / "whole", []) == 0
    assert run(tmp_path / "parts", ["--exit-interval", "2"]) == 0  # stops after the first PPO step (2 iterations)
    assert latest_iteration(str(tmp_path / "parts")) == 2
    assert run(tmp_path / "parts", []) == 0  # resumes: weights, optimizer, counters, stream position
    whole = read_logical_tensors(tmp_path / "whole" / "iter_0000004")
    parts = read_logical_tensors(tmp_path / "parts" / "iter_0000004")
    assert whole.keys() == parts.keys()
    for name, value in whole.items():
        torch.testing.assert_close(parts[name], value, rtol=1e-6, atol=1e-7)


def test_dynamic_sampling_drops_groups_without_signal(world_of_one, files, tmp_path):
    """A reward that is 1 for even prompts' responses of even length and 0 otherwise leaves some groups all-equal;
    they are dropped and more prompts drawn (the stream advances by whole batches), and the step trains on the
    groups with a signal."""
    reward = tmp_path / "parity.py"
    reward.write_text("def parity(prompt, response, label):\n"
                      "    return float(int(label) % 2 == 0 and len(response) % 2 == 0)\n")
    argv = argv_of(files, ["--micro-batch-size", "2", "--ppo-dynamic-sampling-max-replay", "3",
                           "--ppo-logps-fwd-micro-batch-size", "1", "--global-batch-size", "4"])
    argv[argv.index("--reward-fn") + 1] = f"{reward}:parity"
    job, state, _ = build_job(argv)
    metrics = ppo_step(job, state)
    assert metrics["groups_dropped"] > 0 and state.prompts_consumed == 4 * (1 + metrics["replays"])
    assert not metrics.get("skipped") and metrics["groups_without_signal"] == 0  # trained on groups with a signal
    assert metrics["replays"] == 3 and metrics["groups_short"] == 2  # 2 of 4 groups found in 4 rollouts (seeded)
    ps.destroy_model_parallel(job.run.groups)


def test_grpo_raises_a_learnable_reward(world_of_one, files):
    """The whole loop learns: with the reward 'share of digits in the response', 12 PPO steps of GRPO on a model
    from its seed raise the mean reward several times over (measured 0.03 -> 0.62; seeded, so deterministic)."""
    argv = argv_of(files, ["--micro-batch-size", "16", "--ppo-sampling-repeat", "8", "--ppo-sampling-keep", "8",
                           "--global-batch-size", "16", "--ppo-logps-fwd-micro-batch-size", "8", "--lr", "1e-2",
                           "--lr-decay-style", "constant", "--grpo-kl-loss-beta", "0"])
    argv.remove("--ppo-auto-calc-args")
    del argv[argv.index("--train-iters"):argv.index("--train-iters") + 2]
    argv[argv.index("--ppo-step-per-epoch") + 1] = "12"
    job, state, _ = build_job(argv)
    rewards = [ppo_step(job, state)["reward_mean"] for _ in range(12)]
    ps.destroy_model_parallel(job.run.groups)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 0.3 and last > 4 * first, rewards


def test_a_ppo_step_on_the_8_rank_launch_layout_equals_one_process(world_of_one, files):
    """The layout of launch/rl_8xH20.sh (TP2 CP4 EP4 ETP2, SP, the distributed optimizer) with routing replay and a
    KL penalty: one PPO step equals one process."""
    argv = argv_of(files, ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
                           "--moe-aux-loss-coeff", "0", "--moe-router-replay", "--tensor-model-parallel-size", "2",
                           "--context-parallel-size", "4", "--expert-model-parallel-size", "4",
                           "--expert-tensor-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer",
                           "--micro-batch-size", "2", "--ppo-resp-seq-len", "4", "--ppo-sampling-repeat", "2",
                           "--ppo-sampling-keep", "2", "--global-batch-size", "8", "--ppo-logps-fwd-micro-batch-size",
                           "4"])
    argv[argv.index("--ppo-rollout-global-batch-size") + 1] = "4"
    ref = one_ppo_step(reference_argv(argv, 2))
    assert ref["metrics"]["reward_std"] > 0
    results = run_distributed(8, one_ppo_step, argv)
    for r in results:
        assert r["metrics"]["reward_mean"] == pytest.approx(ref["metrics"]["reward_mean"], rel=1e-6)
        if r["logs"]:
            assert r["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-5, abs=1e-7)
    params = merged_params(results)
    for name, want in ref["params"].items():
        assert relative_error(params[name], want) < 1e-5, name
