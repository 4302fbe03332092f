"""The derived values of an RL job and the rules they must satisfy (`megalite plan rl`, and the job's start-up).

With --ppo-auto-calc-args (and --ppo-step-per-epoch, --train-iters, --save-interval given as -1):
    prompts                    = sum over prompt files of (lines cut down to a multiple of the rollout global batch)
    ppo_step_per_epoch         = prompts // rollout_global_batch
    kept_global_batch          = rollout_global_batch x sampling_keep                 (samples per PPO step)
    train_iters_each_rollout   = kept_global_batch // global_batch_size x ppo_max_epochs_2
    train_iters                = ppo_max_epochs x ppo_step_per_epoch x train_iters_each_rollout
    save_interval              = ppo_step_save_interval x train_iters_each_rollout    (the same for evaluation)
Without it, --ppo-step-per-epoch is given and the rest follows the same way; a --train-iters or --save-interval that
disagrees is an error. Rollout replicas are the DP x CP ranks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megalite.config import MegaliteConfig
from megalite.errors import ConfigError, DataError
from megalite.rl.config import RLConfig

GSPO_CLIP = (3e-4, 4e-4)
"""GSPO's clip range (low, high) from the GSPO paper, the defaults with --use-gspo-loss."""


@dataclass(frozen=True)
class RLPlan:
    """An RL job's derived values (see the module docstring)."""

    files: tuple[tuple[str, int, int], ...]
    """(prompt file, its lines, the lines used: cut to a multiple of the rollout global batch)."""
    rollout_replicas: int
    ppo_step_per_epoch: int
    kept_global_batch: int
    train_iters_each_rollout: int
    train_iters: int
    save_interval: int | None
    eval_interval: int | None
    clip_low: float
    clip_high: float
    resp_seq_len: int
    eval_set: int = 0
    """Prompts of the evaluation set (--ppo-eval-steps x the evaluation batch; 0: no evaluation)."""

    @property
    def prompts(self) -> int:
        return sum(used for _, _, used in self.files)

    def samples_total(self, rl: RLConfig) -> int:
        return rl.ppo_max_epochs * self.ppo_step_per_epoch * self.kept_global_batch

    def table(self, rl: RLConfig) -> str:
        rows = [(f"prompts of {path}", f"{used:,} of {lines:,} lines") for path, lines, used in self.files]
        rows += [
            ("prompts (sum)", f"{self.prompts:,}"),
            ("rollout replicas (DP x CP)", f"{self.rollout_replicas}"),
            ("PPO steps per epoch", f"{self.ppo_step_per_epoch:,}"),
            ("samples per PPO step (kept)", f"{self.kept_global_batch:,} = {rl.ppo_rollout_global_batch_size} prompts "
                                            f"x {rl.ppo_sampling_keep} kept of {rl.ppo_sampling_repeat}"),
            ("samples in all", f"{self.samples_total(rl):,}"),
            ("optimizer steps per PPO step", f"{self.train_iters_each_rollout}"),
            ("train iterations", f"{self.train_iters:,}"),
            ("save interval (iterations)", "none" if self.save_interval is None else f"{self.save_interval}"),
            ("eval interval (iterations)", "none" if self.eval_interval is None else f"{self.eval_interval}"),
            ("evaluation", self._evaluation(rl)),
            ("clip range of the ratio", f"[1 - {self.clip_low:g}, 1 + {self.clip_high:g}]"
                                        + (" (GSPO, sequence level)" if rl.use_gspo_loss else "")),
            ("response length", f"<= {self.resp_seq_len:,} tokens"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

    def _evaluation(self, rl: RLConfig) -> str:
        if not self.eval_set:
            return "none (no --ppo-eval-data-path)"
        every = f"every {rl.ppo_step_eval_interval} PPO steps, " if rl.ppo_step_eval_interval else ""
        temperature = rl.ppo_rollout_temperature if rl.ppo_eval_temperature is None else rl.ppo_eval_temperature
        return (f"{every}before the first and after the last: {self.eval_set} held-out prompts x "
                f"{rl.ppo_eval_sampling_repeat} samples, temperature {temperature:g}")


def count_prompts(path: str, flag: str = "--data-path") -> int:
    """Non-empty lines of a prompt file (given with `flag`)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{flag} {path}: no such prompt file")
    return sum(1 for line in file.read_bytes().splitlines() if line.strip())


def _eval_rules(rl: RLConfig, replicas: int, eval_prompts: int) -> list[str]:
    gbs = rl.ppo_eval_rollout_global_batch_size or rl.ppo_rollout_global_batch_size
    micro = rl.ppo_eval_rollout_micro_batch_size or rl.ppo_rollout_micro_batch_size
    errors = []
    if rl.ppo_step_eval_interval is not None and not rl.ppo_eval_data_path:
        errors.append(f"--ppo-step-eval-interval {rl.ppo_step_eval_interval} needs held-out prompts: "
                      "--ppo-eval-data-path FILE.jsonl")
    if not rl.ppo_eval_data_path:
        return errors
    if min(gbs, micro, rl.ppo_eval_steps, rl.ppo_eval_sampling_repeat) < 1:
        return errors + ["--ppo-eval-steps, --ppo-eval-rollout-global-batch-size, "
                         "--ppo-eval-rollout-micro-batch-size and --ppo-eval-sampling-repeat must be >= 1"]
    if gbs % (replicas * micro):
        errors.append(f"--ppo-eval-rollout-global-batch-size {gbs} is not divisible by the rollout replicas (DP x CP = "
                      f"{replicas}) x --ppo-eval-rollout-micro-batch-size {micro}")
    if eval_prompts < rl.ppo_eval_steps * gbs:
        errors.append(f"--ppo-eval-data-path holds {eval_prompts} prompts, fewer than --ppo-eval-steps "
                      f"{rl.ppo_eval_steps} x --ppo-eval-rollout-global-batch-size {gbs}")
    if rl.ppo_eval_temperature is not None and rl.ppo_eval_temperature < 0:
        errors.append(f"--ppo-eval-temperature {rl.ppo_eval_temperature} must be >= 0 (0 is greedy)")
    return errors


def _rules(config: MegaliteConfig, rl: RLConfig, replicas: int, kept: int, resp: int, dp: int) -> list[str]:
    t, m, gbs = config.training, config.model, rl.ppo_rollout_global_batch_size
    train_gbs = t.global_batch_size
    errors = []
    if rl.ppo_auto_calc_args:
        given = [f"{flag} {value}" for flag, value in (("--ppo-step-per-epoch", rl.ppo_step_per_epoch),
                                                         ("--train-iters", t.train_iters),
                                                         ("--save-interval", t.save_interval))
                 if value not in (None, -1)]
        if given:
            errors.append(f"--ppo-auto-calc-args derives these; give them as -1: {', '.join(given)}")
    elif rl.ppo_step_per_epoch in (None, -1):
        errors.append("--ppo-step-per-epoch N is needed without --ppo-auto-calc-args (or pass --ppo-auto-calc-args "
                      "to derive it from the prompt files)")
    if min(gbs, rl.ppo_rollout_micro_batch_size, rl.ppo_sampling_repeat, rl.ppo_sampling_keep,
           rl.ppo_logps_fwd_micro_batch_size, rl.ppo_max_epochs, rl.ppo_max_epochs_2) < 1:
        errors.append("--ppo-rollout-global-batch-size, --ppo-rollout-micro-batch-size, --ppo-sampling-repeat, "
                      "--ppo-sampling-keep, --ppo-logps-fwd-micro-batch-size and the epoch counts must be >= 1")
        return errors
    if gbs % (replicas * rl.ppo_rollout_micro_batch_size):
        errors.append(f"--ppo-rollout-global-batch-size {gbs} is not divisible by the rollout replicas (DP x CP = "
                      f"{replicas}) x --ppo-rollout-micro-batch-size {rl.ppo_rollout_micro_batch_size}")
    if rl.ppo_sampling_keep > rl.ppo_sampling_repeat:
        errors.append(f"--ppo-sampling-keep {rl.ppo_sampling_keep} is more than --ppo-sampling-repeat "
                      f"{rl.ppo_sampling_repeat}")
    strategy = rl.ppo_sampling_keeping_strategy
    if strategy == "all" and rl.ppo_sampling_keep != rl.ppo_sampling_repeat:
        errors.append(f"--ppo-sampling-keeping-strategy all keeps every response: --ppo-sampling-keep must equal "
                      f"--ppo-sampling-repeat {rl.ppo_sampling_repeat}")
    if strategy == "best-and-worst" and rl.ppo_sampling_keep != 2:
        errors.append("--ppo-sampling-keeping-strategy best-and-worst keeps two responses per prompt: "
                      "--ppo-sampling-keep 2")
    if train_gbs is not None and (kept < train_gbs or kept % train_gbs):
        errors.append(f"the kept samples per PPO step ({kept} = --ppo-rollout-global-batch-size {gbs} x "
                      f"--ppo-sampling-keep {rl.ppo_sampling_keep}) are not a multiple of --global-batch-size "
                      f"{train_gbs}")
    if kept % (dp * rl.ppo_logps_fwd_micro_batch_size):
        errors.append(f"the kept samples per PPO step ({kept}) do not split into --ppo-logps-fwd-micro-batch-size "
                      f"{rl.ppo_logps_fwd_micro_batch_size} x {dp} data-parallel ranks")
    if resp >= m.seq_length:
        errors.append(f"--ppo-resp-seq-len {resp} must be less than --seq-length {m.seq_length} (the prompt needs "
                      "room)")
    if rl.use_gspo_loss is False and rl.ppo_ratio_eps <= 0:
        errors.append(f"--ppo-ratio-eps {rl.ppo_ratio_eps} must be > 0")
    if rl.ppo_dual_clip_ratio_c is not None and rl.ppo_dual_clip_ratio_c <= 1:
        errors.append(f"--ppo-dual-clip-ratio-c {rl.ppo_dual_clip_ratio_c} must be > 1")
    if rl.moe_router_replay and not m.num_experts:
        errors.append("--moe-router-replay needs an MoE model (--num-experts)")
    if rl.moe_router_replay and m.moe_expert_capacity_factor is not None:
        errors.append("--moe-router-replay with --moe-expert-capacity-factor is refused: the replayed choices would "
                      "be dropped by other capacities; train dropless")
    if rl.ppo_step_save_interval is not None and rl.ppo_step_save_interval < 1:
        errors.append(f"--ppo-step-save-interval {rl.ppo_step_save_interval} must be >= 1")
    if rl.ppo_step_eval_interval is not None and rl.ppo_step_eval_interval < 1:
        errors.append(f"--ppo-step-eval-interval {rl.ppo_step_eval_interval} must be >= 1")
    return errors


def plan_rl(config: MegaliteConfig, rl: RLConfig, world_size: int, prompt_counts: list[tuple[str, int]],
            eval_prompts: int = 0) -> tuple[MegaliteConfig, RLPlan]:
    """The job's derived values and `config` with --train-iters, --save-interval and --eval-interval set from them
    (and without --data-path: the prompt files are the plan's); ConfigError listing every rule broken.
    `eval_prompts`: the prompts of the --ppo-eval-data-path files."""
    p, t = config.parallel, config.training
    dense = p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
    dp = max(world_size // dense, 1)
    replicas = dp * p.context_parallel_size
    gbs = rl.ppo_rollout_global_batch_size
    kept = gbs * rl.ppo_sampling_keep
    resp = rl.ppo_resp_seq_len or config.model.seq_length // 2
    errors = _rules(config, rl, replicas, kept, resp, dp) + _eval_rules(rl, replicas, eval_prompts)
    if errors:
        raise ConfigError("invalid RL configuration:\n  - " + "\n  - ".join(errors))
    files = tuple((path, n, n - n % gbs) for path, n in prompt_counts)
    prompts = sum(used for _, _, used in files)
    steps = prompts // gbs if rl.ppo_auto_calc_args else rl.ppo_step_per_epoch
    if steps < 1:
        raise ConfigError(f"the prompt files hold {prompts} usable prompts, fewer than one rollout batch "
                          f"(--ppo-rollout-global-batch-size {gbs})")
    train_gbs = t.global_batch_size or kept
    each = kept // train_gbs * rl.ppo_max_epochs_2
    iters = rl.ppo_max_epochs * steps * each
    save = rl.ppo_step_save_interval * each if rl.ppo_step_save_interval else None
    evaluate = rl.ppo_step_eval_interval * each if rl.ppo_step_eval_interval else None
    if not rl.ppo_auto_calc_args:
        wrong = [f"{flag} {given} (derived: {want})" for flag, given, want in
                 (("--train-iters", t.train_iters, iters), ("--save-interval", t.save_interval, save))
                 if given not in (None, -1) and given != want]
        if wrong:
            raise ConfigError("these disagree with the PPO steps (drop them, or fix --ppo-step-per-epoch): "
                              + ", ".join(wrong))
    low, high = GSPO_CLIP if rl.use_gspo_loss else (rl.ppo_ratio_eps, rl.ppo_ratio_eps)
    low = rl.ppo_clip_ratio_low if rl.ppo_clip_ratio_low is not None else low
    high = rl.ppo_clip_ratio_high if rl.ppo_clip_ratio_high is not None else high
    training = dataclasses.replace(t, train_iters=iters, save_interval=save, global_batch_size=train_gbs,
                                   eval_interval=evaluate if evaluate else t.eval_interval)
    eval_set = rl.ppo_eval_steps * (rl.ppo_eval_rollout_global_batch_size or gbs) if rl.ppo_eval_data_path else 0
    plan = RLPlan(files, replicas, steps, kept, each, iters, save, evaluate, low, high, resp, eval_set)
    # the prompt files are the plan's; the model, optimizer and layout rules see no pretraining dataset
    return dataclasses.replace(config, training=training, data=dataclasses.replace(config.data, data_path=None)), plan
