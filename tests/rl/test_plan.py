"""The RL job's derived values: the reference example of the issue (prompt files of 2048 and 6973 lines on the 8-rank
launch layout) reproduces every number; each rule rejects its case with a message naming the flags; clip ranges;
`megalite plan rl` prints the table and the memory, whose KV cache follows the formula."""
import re
import subprocess
import sys

import pytest

from megalite.arguments import parse_args
from megalite.errors import ConfigError
from megalite.memory import GIB
from megalite.rl.config import RLConfig
from megalite.rl.plan import count_prompts, plan_rl
from megalite.rl.plan_cli import build_rl_parser, kv_cache_bytes, plan_from_flags

LAYOUT = ["--tensor-model-parallel-size", "2", "--context-parallel-size", "4", "--expert-model-parallel-size", "4",
          "--expert-tensor-parallel-size", "2", "--sequence-parallel"]
QWEN_MOE = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--ffn-hidden-size", "5632",
            "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--num-experts", "60",
            "--moe-router-topk", "4", "--moe-ffn-hidden-size", "1408", "--moe-shared-expert-intermediate-size", "5632",
            "--bf16", "--micro-batch-size", "1", "--vocab-size", "151936"]
REFERENCE = ("--ppo-auto-calc-args --ppo-max-epochs 1 --ppo-step-per-epoch -1 --ppo-rollout-global-batch-size 32 "
             "--ppo-rollout-micro-batch-size 1 --ppo-sampling-repeat 8 --ppo-sampling-keep 8 "
             "--ppo-sampling-keeping-strategy all --global-batch-size 32 --ppo-max-epochs-2 1 "
             "--ppo-step-save-interval 5 --seq-length 32768 --ppo-resp-seq-len 28672 "
             "--ppo-logps-fwd-micro-batch-size 4 --train-iters -1 --save-interval -1 --save ckpt").split()


def flags(argv: list[str]):
    ns = build_rl_parser("test").parse_args(argv)
    from megalite.arguments import config_from_namespace, section_from_namespace

    return config_from_namespace(ns), section_from_namespace(ns, RLConfig)


def test_the_reference_example_reproduces_every_number():
    config, rl = flags(LAYOUT + QWEN_MOE + REFERENCE)
    config, plan = plan_rl(config, rl, 8, [("a.jsonl", 2048), ("b.jsonl", 6973)])
    assert plan.files == (("a.jsonl", 2048, 2048), ("b.jsonl", 6973, 6944))
    assert plan.prompts == 8992 and plan.ppo_step_per_epoch == 281 and plan.kept_global_batch == 256
    assert plan.samples_total(rl) == 71_936 and plan.train_iters_each_rollout == 8 and plan.train_iters == 2248
    assert plan.save_interval == 40 and plan.rollout_replicas == 4  # DP 1 x CP 4
    assert config.training.train_iters == 2248 and config.training.save_interval == 40
    table = plan.table(rl)
    for number in ("8,992", "281", "256", "71,936", "2,248", "40", "6,944 of 6,973"):
        assert number in table


def test_kv_cache_bytes_follow_the_formula():
    config, rl = flags(LAYOUT + QWEN_MOE + REFERENCE)
    # 1 prompt x 8 samples x 32768 tokens x 2 x 24 layers x (16 K/V heads / TP 2) x 128 x 2 bytes (bf16)
    assert kv_cache_bytes(config, rl) == 8 * 32768 * 2 * 24 * 8 * 128 * 2 == 24 * GIB


@pytest.mark.parametrize("change, message", [
    (["--train-iters", "100"], "--ppo-auto-calc-args derives these; give them as -1: --train-iters 100"),
    (["--ppo-rollout-global-batch-size", "30"], "--ppo-rollout-global-batch-size 30 is not divisible by the rollout "
                                                "replicas (DP x CP = 4) x --ppo-rollout-micro-batch-size 1"),
    (["--ppo-sampling-keep", "9", "--ppo-sampling-keeping-strategy", "test"],
     "--ppo-sampling-keep 9 is more than --ppo-sampling-repeat 8"),
    (["--ppo-sampling-keep", "4"], "--ppo-sampling-keeping-strategy all keeps every response"),
    (["--ppo-sampling-keep", "3", "--ppo-sampling-keeping-strategy", "best-and-worst"],
     "best-and-worst keeps two responses per prompt: --ppo-sampling-keep 2"),
    (["--global-batch-size", "48"], "are not a multiple of --global-batch-size 48"),
    (["--ppo-resp-seq-len", "32768"], "--ppo-resp-seq-len 32768 must be less than --seq-length 32768"),
    (["--ppo-dual-clip-ratio-c", "0.5"], "--ppo-dual-clip-ratio-c 0.5 must be > 1"),
    (["--ppo-logps-fwd-micro-batch-size", "3"], "the kept samples per PPO step (256) do not split into "
                                                "--ppo-logps-fwd-micro-batch-size 3 x 1 data-parallel ranks"),
    (["--moe-router-replay", "--moe-expert-capacity-factor", "1.5"], "--moe-router-replay with "
                                                                     "--moe-expert-capacity-factor is refused"),
])
def test_each_rule_names_its_flags(change, message):
    config, rl = flags(LAYOUT + QWEN_MOE + REFERENCE + change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_rl(config, rl, 8, [("a.jsonl", 2048)])


@pytest.mark.parametrize("change, held_out, message", [
    (["--ppo-step-eval-interval", "5"], 0, "--ppo-step-eval-interval 5 needs held-out prompts: --ppo-eval-data-path"),
    (["--ppo-eval-data-path", "e.jsonl", "--ppo-eval-rollout-global-batch-size", "6"], 64,
     "--ppo-eval-rollout-global-batch-size 6 is not divisible by the rollout replicas (DP x CP = 4)"),
    (["--ppo-eval-data-path", "e.jsonl", "--ppo-eval-steps", "3"], 64,
     "--ppo-eval-data-path holds 64 prompts, fewer than --ppo-eval-steps 3 x --ppo-eval-rollout-global-batch-size 32"),
    (["--ppo-eval-data-path", "e.jsonl", "--ppo-eval-temperature", "-1"], 64, "--ppo-eval-temperature -1.0 must be"),
])
def test_each_evaluation_rule_names_its_flags(change, held_out, message):
    config, rl = flags(LAYOUT + QWEN_MOE + REFERENCE + change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_rl(config, rl, 8, [("a.jsonl", 2048)], held_out)


def test_the_evaluation_set_and_interval():
    extra = ["--ppo-eval-data-path", "e.jsonl", "--ppo-eval-steps", "2", "--ppo-eval-rollout-global-batch-size", "8",
             "--ppo-step-eval-interval", "10", "--ppo-eval-sampling-repeat", "4", "--ppo-eval-temperature", "0"]
    config, rl = flags(LAYOUT + QWEN_MOE + REFERENCE + extra)
    config, plan = plan_rl(config, rl, 8, [("a.jsonl", 2048)], 20)
    assert plan.eval_set == 16 and plan.eval_interval == 80 and config.training.eval_interval == 80
    assert ("every 10 PPO steps, before the first and after the last: 16 held-out prompts x 4 samples, "
            "temperature 0") in plan.table(rl)
    config, rl = flags(LAYOUT + QWEN_MOE + REFERENCE)
    assert plan_rl(config, rl, 8, [("a.jsonl", 2048)])[1].eval_set == 0


def test_without_auto_calc_the_steps_are_given_and_checked():
    base = [f for f in REFERENCE if f not in ("--ppo-auto-calc-args",)]
    config, rl = flags(LAYOUT + QWEN_MOE + base)
    with pytest.raises(ConfigError, match="--ppo-step-per-epoch N is needed without --ppo-auto-calc-args"):
        plan_rl(config, rl, 8, [])
    argv = LAYOUT + QWEN_MOE + base + ["--ppo-step-per-epoch", "10", "--train-iters", "81"]
    config, rl = flags(argv)
    with pytest.raises(ConfigError, match=re.escape("--train-iters 81 (derived: 80)")):
        plan_rl(config, rl, 8, [])
    config, rl = flags(argv[:-1] + ["80"])
    assert plan_rl(config, rl, 8, [])[1].train_iters == 80


def test_clip_ranges():
    def clip(extra):
        config, rl = flags(LAYOUT + QWEN_MOE + REFERENCE + extra)
        plan = plan_rl(config, rl, 8, [("a.jsonl", 64)])[1]
        return plan.clip_low, plan.clip_high

    assert clip([]) == (0.2, 0.2)
    assert clip(["--ppo-ratio-eps", "0.1", "--ppo-clip-ratio-high", "0.28"]) == (0.1, 0.28)  # clip-higher
    assert clip(["--use-gspo-loss"]) == (3e-4, 4e-4)
    assert clip(["--use-gspo-loss", "--ppo-clip-ratio-low", "2e-4"]) == (2e-4, 4e-4)


def test_plan_rl_command(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i} + 1", "label": "{i + 1}"}}\n' for i in range(70)) + "\n")
    assert count_prompts(str(prompts)) == 70
    argv = (["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "128",
             "--seq-length", "64", "--data-path", str(prompts), "--ppo-auto-calc-args", "--ppo-step-per-epoch", "-1",
             "--train-iters", "-1", "--ppo-rollout-global-batch-size", "8", "--ppo-sampling-repeat", "4",
             "--ppo-sampling-keep", "4", "--global-batch-size", "16", "--grpo-kl-loss-beta", "0.01",
             "--world-size", "2", "--device", "cpu", "--device-memory-gib", "1"])
    # a fresh process: the fake process group of the memory estimate must be the process's default group
    out = subprocess.run([sys.executable, "-m", "megalite", "plan", "rl", *argv], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert re.search(r"PPO steps per epoch +8\n", out) and re.search(r"optimizer steps per PPO step +2\n", out)
    assert "fits a 1 GiB device" in out and "| 0 (0) |" in out
    ns = build_rl_parser("t").parse_args(argv[:-6])
    config, rl, plan = plan_from_flags(ns, 2)
    assert plan.train_iters == 16 and config.data.data_path is None
    assert parse_args(["--num-layers", "2"]).model.num_layers == 2  # `megalite train` takes no --ppo-* flags
    with pytest.raises(SystemExit):
        parse_args(["--ppo-sampling-repeat", "4"])
