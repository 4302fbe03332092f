"""`megalite rl`: the RL job (docs/rl.md). Flags: every flag of `megalite train` plus the RL flags (`megalite rl
--help`); the model and optimizer come from --load (a megalite checkpoint or a Hugging Face directory, whose model
flags it sets), the frozen reference from --load-ref (default: --load) when --grpo-kl-loss-beta > 0. Without
--data-path it runs the built-in task (`megalite.rl.task`).
"""
from __future__ import annotations

import time

import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import config_from_namespace, resolve, section_from_namespace
from megalite.checkpoint import TrainState, load_checkpoint
from megalite.checkpoint.flags import model_flags_from_checkpoint
from megalite.distributed import init_distributed
from megalite.engine.checks import resume_source
from megalite.engine.log import Logger, configure_logging
from megalite.engine.setup import setup, with_vocab_size
from megalite.errors import ConfigError
from megalite.flops import device_peak_tflops, step_flops, throughput_summary
from megalite.optim.lr_schedule import schedule_from_config
from megalite.rl.config import RLConfig
from megalite.rl.data import PromptStream, read_prompts
from megalite.rl.evaluate import evaluate
from megalite.rl.plan import plan_rl
from megalite.rl.plan_cli import build_rl_parser
from megalite.rl.rewards import load_reward_fn, rule_reward
from megalite.rl import task
from megalite.rl.step import RLJob, RLState, ppo_step
from megalite.sft.chat import build_chat_format
from megalite.training import checkpoint_meta, save


def build_job(argv: list[str]) -> tuple[RLJob, RLState, str | None]:
    """Parse, plan, initialise the processes, build and load the policy (and the reference), and the prompt stream;
    the counters to go on from (a run whose --save holds checkpoints resumes from them: weights, optimizer, counters,
    stream position and dropout streams), and a line for the log."""
    from megalite.data.tokenizers import build_tokenizer

    ns = build_rl_parser("megalite rl").parse_args(argv)
    if ns.load:
        model_flags_from_checkpoint(ns)
    config, rl = config_from_namespace(ns), section_from_namespace(ns, RLConfig)
    if not config.data.data_path:
        raise ConfigError("--data-path PROMPTS.jsonl [...] is needed (JSON lines with --prompt-key and --label-key "
                          "fields); `megalite rl` without it runs the built-in task")
    files = [read_prompts(p, rl.prompt_key, rl.label_key) for p in config.data.data_path]
    held_out = [p for path in rl.ppo_eval_data_path or []
                for p in read_prompts(path, rl.prompt_key, rl.label_key, "--ppo-eval-data-path")]
    init_distributed(config.parallel.distributed_backend, config.parallel.distributed_timeout_minutes)
    config, plan = plan_rl(config, rl, dist.get_world_size(),
                           [(p, len(f)) for p, f in zip(config.data.data_path, files)], len(held_out))
    config, derived = resolve(config, dist.get_world_size())
    tokenizer = build_tokenizer(config.data, config.model.vocab_size)
    config = with_vocab_size(config, tokenizer.vocab_size)
    t = config.training
    source, note = resume_source(t)
    own = source is not None and source == t.save
    reference_source = rl.load_ref or (t.load if t.load and t.load != t.save else None)
    if own and rl.grpo_kl_loss_beta > 0 and reference_source is None:
        raise ConfigError(f"resuming from --save {t.save} with a KL penalty needs the reference model's checkpoint: "
                          "--load-ref (or --load)")
    run = setup(config, derived)
    state = RLState()
    if source is not None:
        loaded = load_checkpoint(source, run, checkpoint_meta(run), load_optim=own, load_rng=own, finetune=not own)
        if own:  # saves happen at PPO-step boundaries only
            s = loaded.state
            state = RLState(s.iteration // plan.train_iters_each_rollout, s.iteration, s.consumed_samples)
            note = f"resumed from {loaded.directory} at PPO step {state.ppo_step} (iteration {s.iteration})"
    ref = None
    if rl.grpo_kl_loss_beta > 0:
        ref = setup(config, derived, trainable=False, groups=run.groups)
        if reference_source:
            load_checkpoint(reference_source, ref, checkpoint_meta(ref), load_optim=False, load_rng=False,
                            finetune=True)
        else:  # no checkpoint: the reference is the policy's initialisation, from the same seed
            ref.model.load_state_dict(run.model.state_dict())
    reward, name = rule_reward, "the rule reward"
    if rl.reward_fn:
        reward, name = load_reward_fn(rl.reward_fn), f"--reward-fn {rl.reward_fn}"
    stream = PromptStream(files, [used for _, _, used in plan.files], config.training.seed)
    chat = build_chat_format(config.sft, tokenizer, config.data.tokenizer_model)
    schedule = schedule_from_config(config.training, plan.train_iters)
    job = RLJob(run, ref, rl, plan, chat, tokenizer, stream, reward, schedule, name, held_out[:plan.eval_set])
    return job, state, note


def _step_line(job: RLJob, state: RLState, total: int, m: dict[str, float], seconds: float) -> str:
    run = job.run
    # the training part: each optimizer step trains a global batch of --seq-length tokens (train tokens/s counts them)
    flops = step_flops(run.config)
    train_flops = flops.model / flops.tokens * m["train_tokens_per_s"] * m["time_train_s"]
    throughput, _ = throughput_summary(train_flops, m["time_train_s"], run.derived.world_size,
                                       device_peak_tflops(run.config.training.peak_tflops, run.device))
    dynamic = (f" | dropped {m['groups_dropped']:.0f} groups in {m['replays']:.0f} replays"
               + (f", {m['groups_short']:.0f} short of the batch" if m.get("groups_short") else "")
               if job.rl.ppo_dynamic_sampling_max_replay else "")
    return (f" ppo step {state.ppo_step:6d}/{total} | iteration {state.iteration} | reward {m['reward_mean']:.4f} "
            f"+- {m['reward_std']:.4f} | accuracy {m['accuracy']:.3f} | response length "
            f"{m['response_length_mean']:.1f} (max {m['response_length_max']:.0f}, cut {m['cut_share']:.2f}) | "
            f"loss {m['loss']:.4f} | clip low/high {m.get('clip_low', 0):.3f}/{m.get('clip_high', 0):.3f} | "
            f"ppo_kl {m.get('ppo_kl', 0):.2e} | kl {m.get('kl', 0):.2e} | groups without signal "
            f"{m['groups_without_signal']:.0f} | logprob gap {m['logprob_gap']:.2e} | rollout tokens/s "
            f"{m['rollout_tokens_per_s']:.0f} | train tokens/s {m['train_tokens_per_s']:.0f}{throughput} | "
            f"time rollout/ref/old/train {m['time_rollout_s']:.1f}/{m['time_reference_s']:.1f}/"
            f"{m['time_old_logprobs_s']:.1f}/{m['time_train_s']:.1f} s ({seconds:.1f} s){dynamic}")


def _evaluate(job: RLJob, state: RLState, log: Logger) -> None:
    started = time.perf_counter()
    m = evaluate(job)
    log.line(f" eval at ppo step {state.ppo_step} | held-out reward {m['eval/reward_mean']:.4f} | accuracy "
             f"{m['eval/accuracy']:.3f} | response length {m['eval/response_length_mean']:.1f} | "
             f"{len(job.eval_prompts)} prompts x {job.rl.ppo_eval_sampling_repeat} samples "
             f"({time.perf_counter() - started:.1f} s)")
    log.scalars(state.iteration, m)


def main(argv: list[str]) -> int:
    if build_rl_parser("megalite rl").parse_args(argv).data_path is None:
        return task.run(argv, main)
    owned = not dist.is_initialized()
    job, state, note = build_job(argv)
    if dist.get_rank() == 0:
        configure_logging()
    log = Logger(job.run)
    log.line("RL job:\n" + job.plan.table(job.rl))
    if note:
        log.line(note)
    total = job.rl.ppo_max_epochs * job.plan.ppo_step_per_epoch
    t, every = job.run.config.training, job.rl.ppo_step_eval_interval
    if job.eval_prompts:
        _evaluate(job, state, log)
    evaluated = True
    while state.ppo_step < total:
        started = time.perf_counter()
        m = ppo_step(job, state)
        evaluated = bool(job.eval_prompts and every and state.ppo_step % every == 0)
        if m.get("skipped"):
            log.line(f" ppo step {state.ppo_step:6d}/{total} | every group's rewards were equal after "
                     f"{m['replays']:.0f} replays: nothing to learn, no training")
            if evaluated:
                _evaluate(job, state, log)
            continue
        log.line(_step_line(job, state, total, m, time.perf_counter() - started))
        log.scalars(state.iteration, m)
        if evaluated:
            _evaluate(job, state, log)
        stop = bool(t.exit_interval) and state.iteration >= t.exit_interval
        if t.save and ((t.save_interval and state.iteration % t.save_interval == 0) or stop):
            save(job.run, TrainState(state.iteration, state.prompts_consumed), log)
        if stop:
            log.line(f"--exit-interval {t.exit_interval}: stopping after PPO step {state.ppo_step}")
            break
    if job.eval_prompts and not evaluated:
        _evaluate(job, state, log)
    log.close()
    ps.destroy_model_parallel(job.run.groups)
    if owned:
        dist.destroy_process_group()
    return 0
