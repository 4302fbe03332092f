"""The RL flags (`megalite plan rl`, and the RL job): Megatron-style `--ppo-*` spellings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RLConfig:
    """Reinforcement learning from rewards: rollouts, keeping, PPO-style steps (docs/rl.md)."""

    ppo_auto_calc_args: bool = False
    """Derive --ppo-step-per-epoch, --train-iters and --save-interval (each then given as -1) from the prompt files
    and the batch sizes (docs/rl.md)."""
    ppo_max_epochs: int = 1
    """Passes over the prompts."""
    ppo_max_epochs_2: int = 1
    """Passes over each rollout's kept samples (optimizer steps per rollout = kept samples / global batch x this)."""
    ppo_step_per_epoch: int | None = None
    """PPO steps (rollouts) per epoch; -1 with --ppo-auto-calc-args: prompts / rollout global batch."""
    ppo_step_save_interval: int | None = None
    """Save a checkpoint every this many PPO steps."""
    ppo_step_eval_interval: int | None = None
    """Evaluate (rollouts on the held-out prompts of --ppo-eval-data-path, no training) every this many PPO steps;
    with --ppo-eval-data-path the job also evaluates before the first PPO step and after the last."""
    ppo_eval_data_path: list[str] | None = None
    """Held-out prompt files (JSON lines, the keys of --data-path): the first --ppo-eval-steps x
    --ppo-eval-rollout-global-batch-size prompts are the evaluation set, the same at every evaluation."""
    ppo_eval_temperature: float | None = None
    """Sampling temperature of evaluations (default: --ppo-rollout-temperature; 0: greedy)."""
    ppo_eval_steps: int = 1
    """Rollout batches per evaluation."""
    ppo_eval_rollout_global_batch_size: int | None = None
    """Prompts per evaluation batch (default: --ppo-rollout-global-batch-size)."""
    ppo_eval_rollout_micro_batch_size: int | None = None
    """Prompts per replica per evaluation generation batch (default: --ppo-rollout-micro-batch-size)."""
    ppo_eval_sampling_repeat: int = 1
    """Responses per evaluation prompt."""
    ppo_rollout_global_batch_size: int = 32
    """Prompts per PPO step (over all rollout replicas)."""
    ppo_rollout_micro_batch_size: int = 1
    """Prompts per rollout replica (DP x CP rank) per generation batch."""
    ppo_sampling_repeat: int = 8
    """Responses generated per prompt (a group)."""
    ppo_sampling_keep: int = 8
    """Responses kept per prompt for training (see --ppo-sampling-keeping-strategy)."""
    ppo_sampling_keeping_strategy: Literal["all", "best-and-worst", "test"] = "all"
    """all: every response (--ppo-sampling-keep = --ppo-sampling-repeat); test: the first --ppo-sampling-keep of each
    group; best-and-worst: the highest- and lowest-reward response of each group (--ppo-sampling-keep 2)."""
    ppo_resp_seq_len: int | None = None
    """Most tokens of a response (default: --seq-length / 2); prompt + response fit --seq-length."""
    ppo_logps_fwd_micro_batch_size: int = 1
    """Samples per forward-only microbatch of the old and reference log-probabilities."""
    ppo_rollout_temperature: float = 1.0
    """Sampling temperature of rollouts."""
    ppo_rollout_top_p: float = 1.0
    """Top-p of rollouts (1: off)."""
    ppo_rollout_top_k: int = 0
    """Top-k of rollouts (0 or -1: off)."""
    ppo_ratio_eps: float = 0.2
    """Clip range of the importance ratio: [1 - eps, 1 + eps] (each side overridden by the two flags below)."""
    ppo_clip_ratio_low: float | None = None
    """Lower clip: ratio >= 1 - this (default: --ppo-ratio-eps; with --use-gspo-loss 3e-4)."""
    ppo_clip_ratio_high: float | None = None
    """Upper clip: ratio <= 1 + this (default: --ppo-ratio-eps; with --use-gspo-loss 4e-4). Larger than the lower
    one: clip-higher."""
    ppo_dual_clip_ratio_c: float | None = None
    """Dual clip: for negative advantages the loss is at most -c x advantage (c > 1; unset: off)."""
    ppo_dynamic_sampling_max_replay: int = 0
    """Dynamic sampling: drop groups whose rewards are all equal and draw more prompts, at most this many times per
    PPO step (0: off)."""
    use_grpo: bool = False
    """Group-relative advantages (no critic): (r - group mean) / (group std + eps)."""
    use_gspo_loss: bool = False
    """GSPO: the sequence-level importance ratio (geometric mean of the token ratios) with its own small clip range."""
    grpo_advantage_epsilon: float = 1e-6
    """eps of the advantage normalisation."""
    grpo_kl_loss_beta: float = 0.0
    """Coefficient of the KL penalty to the reference model (0: no reference model is built)."""
    grpo_no_std_normalization: bool = False
    """Dr. GRPO: advantages r - group mean, not divided by the group's std."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """The per-token KL estimator (Schulman): k1 = log p - log q, k2 = (log p - log q)^2 / 2, k3 = r - 1 - log r with
    r = q / p (p the policy, q the reference)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How token losses become the batch's loss, over the whole global batch: the mean over tokens; the mean over
    sequences of each sequence's sum; the mean over sequences of each sequence's mean."""
    entropy_coeff: float = 0.0
    """Entropy bonus: loss -= this x the mean token entropy."""
    load_ref: str | None = None
    """The frozen reference model: a megalite checkpoint or a Hugging Face directory (default: --load)."""
    moe_router_replay: bool = False
    """MoE: the experts chosen during rollout are used by the old-, reference- and training forwards."""
    prompt_key: str = "prompt"
    """The prompt field of the prompt files (--data-path)."""
    label_key: str = "label"
    """The field holding a prompt's reference answer, which rewards compare with."""
    reward_fn: str | None = None
    """A reward function FILE.py:NAME (docs/rl.md gives its signature); default: the built-in rule rewards."""
