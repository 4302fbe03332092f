"""Evaluation of the RL job: rollouts on held-out prompts, scored by the job's reward function, no training.

The evaluation set is the first --ppo-eval-steps x --ppo-eval-rollout-global-batch-size prompts of
--ppo-eval-data-path, the same at every evaluation, and sample j of prompt i is drawn by the generator keyed by
(--seed, i, j): evaluations before and after training compare the same prompts with the same random numbers.
"""
from __future__ import annotations

import torch

from megalite.inference import SamplingParams
from megalite.rl.step import RLJob, rollout, score


def evaluate(job: RLJob) -> dict[str, float]:
    """Reward mean, accuracy (share of rewards >= 1) and response length of the evaluation set's samples."""
    rl = job.rl
    gbs = rl.ppo_eval_rollout_global_batch_size or rl.ppo_rollout_global_batch_size
    micro = rl.ppo_eval_rollout_micro_batch_size or rl.ppo_rollout_micro_batch_size
    temperature = rl.ppo_rollout_temperature if rl.ppo_eval_temperature is None else rl.ppo_eval_temperature
    params = SamplingParams(temperature, max(rl.ppo_rollout_top_k, 0), rl.ppo_rollout_top_p,
                            job.run.config.training.seed)
    rewards, lengths = [], []
    for start in range(0, len(job.eval_prompts), gbs):
        picked = list(enumerate(job.eval_prompts[start:start + gbs], start))
        _, completions = rollout(job, picked, rl.ppo_eval_sampling_repeat, micro, params)
        rewards.append(score(job, picked, completions, rl.ppo_eval_sampling_repeat))
        lengths += [len(c.tokens) for c in completions]
    r = torch.cat(rewards)
    return {"eval/reward_mean": r.mean().item(), "eval/accuracy": (r >= 1.0).float().mean().item(),
            "eval/response_length_mean": sum(lengths) / len(lengths)}
