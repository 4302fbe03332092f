"""The launch scripts: their flags pass validation, the 8 x H20 job fits its 96 GB cards by megalite's own estimate,
and the CPU rehearsal runs the same layout flags. `torchrun` is replaced by a stub that prints its arguments."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H20_BYTES = 96e9
QWEN_VOCAB = "151936"  # Qwen1.5-MoE-A2.7B's vocabulary (the script's default tokenizer is byte-level)


def launched_flags(script: str, tmp_path: Path, command: str = "train", **env: str) -> list[str]:
    """The `megalite COMMAND` flags the script (a path under the repository) hands to torchrun, given `env`."""
    stub = tmp_path / "torchrun"
    stub.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, **env, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / script)], capture_output=True, text=True, env=env,
                         check=True).stdout.splitlines()
    return out[out.index(command) + 1:]


@pytest.mark.parametrize("script,env", [
    ("launch/train_8xH20.sh", {}),
    ("launch/train_8xH20.sh", {"SAVE_CHECKPOINT_DIR": "/ckpt", "LOAD_CHECKPOINT_DIR": "/ckpt",
                               "DATA_PATH": "0.7 /data/a 0.3 /data/b"}),
    ("launch/train_cpu.sh", {}),
    ("examples/pretrain_gpt.sh", {"DATA_PATH": "/data/a", "CHECKPOINT_DIR": "/ckpt"}),
], ids=["h20", "h20_data_checkpoints", "cpu", "example"])
def test_every_launch_script_passes_validation_on_8_ranks(script, env, tmp_path):
    from megalite.arguments import parse_args, resolve

    resolve(parse_args(launched_flags(script, tmp_path, **env)), 8)


def test_the_8xh20_job_fits_96_gb_cards(tmp_path):
    flags = launched_flags("launch/train_8xH20.sh", tmp_path)
    plan = subprocess.run([sys.executable, "-m", "megalite", "plan", "memory", *flags, "--vocab-size", QWEN_VOCAB,
                           "--world-size", "8"], capture_output=True, text=True, check=True).stdout
    most = float(re.search(r"most: ([\d.]+) GiB", plan).group(1)) * 2**30
    assert most < 0.9 * H20_BYTES, plan  # 10% left for the CUDA context, NCCL buffers and fragmentation


@pytest.mark.parametrize("flag", ["--tensor-model-parallel-size", "--context-parallel-size",
                                  "--pipeline-model-parallel-size", "--expert-model-parallel-size",
                                  "--expert-tensor-parallel-size", "--sequence-parallel", "--cp-comm-type",
                                  "--use-distributed-optimizer", "--moe-token-dispatcher-type"])
def test_the_cpu_rehearsal_uses_the_gpu_jobs_layout(flag, tmp_path):
    gpu, cpu = launched_flags("launch/train_8xH20.sh", tmp_path), launched_flags("launch/train_cpu.sh", tmp_path)

    def value(flags: list[str]) -> list[str]:
        i = flags.index(flag)
        return flags[i:i + 2] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else flags[i:i + 1]

    assert value(gpu) == value(cpu)


def rl_flags(script: str, tmp_path: Path, **env: str) -> list[str]:
    return launched_flags(script, tmp_path, "rl", **env)


H20_RL_ENV = {"DATA_PATH": str(ROOT / "examples" / "rl" / "arithmetic_prompts.jsonl"), "LOAD_CHECKPOINT_DIR": "/sft",
              "SAVE_CHECKPOINT_DIR": "/rl"}


@pytest.mark.parametrize("script,env", [("launch/rl_8xH20.sh", H20_RL_ENV), ("launch/rl_cpu.sh", {})],
                         ids=["h20", "cpu"])
def test_the_rl_launch_scripts_pass_the_rl_plan_on_8_ranks(script, env, tmp_path):
    from megalite.arguments import resolve
    from megalite.rl.plan_cli import build_rl_parser, plan_from_flags

    config, rl, plan = plan_from_flags(build_rl_parser("t").parse_args(rl_flags(script, tmp_path, **env)), 8)
    resolve(config, 8)
    assert rl.moe_router_replay and plan.rollout_replicas == 4 and plan.train_iters_each_rollout >= 1


def test_the_rl_8xh20_job_fits_96_gb_cards_and_the_cpu_rehearsal_uses_its_layout(tmp_path):
    flags = rl_flags("launch/rl_8xH20.sh", tmp_path, **H20_RL_ENV)
    assert flags[flags.index("--load-ref") + 1] == "/sft"  # the reference defaults to the loaded SFT model
    plan = subprocess.run([sys.executable, "-m", "megalite", "plan", "rl", *flags, "--vocab-size", QWEN_VOCAB,
                           "--world-size", "8"], capture_output=True, text=True, check=True).stdout
    most = float(re.search(r"most: ([\d.]+) GiB", plan).group(1)) * 2**30
    assert most < 0.95 * H20_BYTES, plan
    cpu = rl_flags("launch/rl_cpu.sh", tmp_path)
    for flag in ("--tensor-model-parallel-size", "--context-parallel-size", "--expert-model-parallel-size",
                 "--expert-tensor-parallel-size", "--ppo-sampling-keeping-strategy", "--ppo-max-epochs-2"):
        assert flags[flags.index(flag) + 1] == cpu[cpu.index(flag) + 1], flag
    for flag in ("--sequence-parallel", "--moe-router-replay", "--use-grpo", "--ppo-auto-calc-args"):
        assert flag in flags and flag in cpu
    missing = subprocess.run(["bash", str(ROOT / "launch/rl_8xH20.sh")], capture_output=True, text=True,
                             env={**os.environ, "DATA_PATH": ""})
    assert missing.returncode != 0 and "set DATA_PATH to the prompt files" in missing.stderr
