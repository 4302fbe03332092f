"""Every parallel dimension at once: a fixed matrix of 5D layouts at world size 8 and a seeded random sweep over
all valid layouts (dense and MoE, with SP, every pipeline schedule, both CP communication types, with and without
the distributed optimizer), each with a random set of features on top (recomputation, overlapped gradient
reduction, untied embeddings, router variants), against the single-process run (same losses, same parameters
after 3 AdamW steps).

The sweep draws `MEGALITE_SWEEP_CASES` layouts (default 4) with `MEGALITE_SWEEP_SEED` (default 0); run it with
other seeds and more cases to explore further, e.g. `MEGALITE_SWEEP_SEED=7 MEGALITE_SWEEP_CASES=40 pytest
tests/test_layout_sweep.py -k sweep`."""
from __future__ import annotations

import itertools
import os
import random

import pytest

from megalite.arguments import ConfigError, parse_args, resolve
from megalite.testing.reference import assert_matches_single_process

WORLD = 8
SIZES = (1, 2, 4, 8)
SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zb-v")


def layout_argv(tp: int, cp: int, pp: int, ep: int, etp: int, sp: bool, schedule: str | None, cp_comm: str,
                moe: bool, micro_batches: int, distributed_optimizer: bool = False) -> tuple[list[str], int]:
    """Flags of one layout of a tiny GPT (8 layers, GQA, SwiGLU, no biases) and its micro batch size."""
    dp = WORLD // (tp * cp * pp)
    mbs = 1
    argv = [
        "--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4",
        "--num-query-groups", "4" if tp == 4 else "2", "--ffn-hidden-size", "64", "--seq-length", "32",
        "--vocab-size", "128", "--global-batch-size", str(dp * mbs * micro_batches), "--micro-batch-size", str(mbs),
        # lr 0.003 and eps 1e-4: Adam's first steps amplify fp32 summation-order noise (see
        # tests/pipeline/test_pipeline_training.py); measured on tp1_cp2ag_pp2-zb-v_dp2: worst parameter error
        # 1.0e-5 at lr 0.01, 4e-7 at lr 0.003
        "--lr", "0.003", "--adam-eps", "1e-4", "--swiglu", "--disable-bias-linear",
        "--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp),
        "--pipeline-model-parallel-size", str(pp), "--cp-comm-type", cp_comm,
    ]
    if sp:
        argv.append("--sequence-parallel")
    if distributed_optimizer:
        argv += ["--use-distributed-optimizer", "--ddp-bucket-size", "1000"]
    if schedule:
        argv += ["--pipeline-schedule", schedule]
        if schedule == "interleaved":
            argv += ["--num-layers-per-virtual-pipeline-stage", str(8 // (2 * pp))]
    if moe:
        argv += ["--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
                 "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
                 "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "2",
                 "--expert-model-parallel-size", str(ep), "--expert-tensor-parallel-size", str(etp)]
    return argv, mbs


def is_valid(argv: list[str]) -> bool:
    try:
        resolve(parse_args(argv), WORLD)
    except (ConfigError, SystemExit):
        return False
    return True


def all_layouts() -> list[tuple[str, list[str], int]]:
    """Every valid layout of the tiny GPT on 8 ranks, named; (name, argv, micro batch size)."""
    out = []
    for tp, cp, pp in itertools.product(SIZES, repeat=3):
        if WORLD % (tp * cp * pp):
            continue
        for moe, sp, cp_comm, zero in itertools.product((False, True), (False, True), ("p2p", "all_gather"),
                                                        (False, True)):
            if (sp and tp == 1) or (cp_comm == "all_gather" and cp == 1):
                continue
            expert = [(ep, etp) for ep in SIZES for etp in SIZES if (WORLD // pp) % (ep * etp) == 0] if moe else [(1, 1)]
            for (ep, etp), schedule in itertools.product(expert, SCHEDULES if pp > 1 else (None,)):
                argv, mbs = layout_argv(tp, cp, pp, ep, etp, sp, schedule, cp_comm, moe, micro_batches=2 * pp,
                                        distributed_optimizer=zero)
                if is_valid(argv):
                    name = (f"tp{tp}{'sp' if sp else ''}_cp{cp}{'ag' if cp_comm == 'all_gather' else ''}_pp{pp}"
                            f"{'-' + schedule if schedule else ''}_dp{WORLD // (tp * cp * pp)}"
                            f"{f'_moe_ep{ep}_etp{etp}' if moe else ''}{'_distopt' if zero else ''}")
                    out.append((name, argv, mbs))
    return out


MATRIX = {
    # every dimension at once
    "tp2sp_cp2_pp2-1f1b_moe_ep2_etp2": dict(tp=2, cp=2, pp=2, ep=2, etp=2, sp=True, schedule="1f1b"),
    "tp2sp_cp2_pp2-zb-v_moe_ep4_etp1": dict(tp=2, cp=2, pp=2, ep=4, etp=1, sp=True, schedule="zb-v"),
    "tp2_cp2ag_pp2-interleaved_moe_ep2_etp1": dict(tp=2, cp=2, pp=2, ep=2, etp=1, sp=False, schedule="interleaved",
                                                   cp_comm="all_gather"),
    "tp1_cp2_pp2-zb-h1_dp2_moe_ep2_etp1_distopt": dict(tp=1, cp=2, pp=2, ep=2, etp=1, sp=False, schedule="zb-h1",
                                                       distributed_optimizer=True),
}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_five_dimensional_layout_matches_single_process(name, world_of_one):
    spec = {"cp_comm": "p2p", **MATRIX[name]}
    argv, mbs = layout_argv(**spec, moe=True, micro_batches=2 * spec["pp"])
    assert is_valid(argv), name
    assert_matches_single_process(WORLD, argv, micro_batch_size=mbs)


FEATURES = {
    # name in the test id: (flags, MoE only)
    "selective": (["--recompute-granularity", "selective"], False),
    "full": (["--recompute-granularity", "full"], False),
    "overlap": (["--overlap-grad-reduce"], False),
    "untied": (["--untie-embeddings-and-output-weights"], False),
    "bias": (["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01"], True),
    "sigmoid": (["--moe-router-score-function", "sigmoid"], True),
    "qknorm_kv12": (["--qk-layernorm", "--kv-channels", "12"], False),  # Qwen3's attention
    "qkvbias": (["--add-qkv-bias"], False),  # Qwen2's
    "padded_vocab": (["--vocab-size", "100"], False),  # 28 padded ids, -inf logits
    "shared_gate": (["--moe-shared-expert-gate"], True),  # Qwen2-MoE's
    "moe_pattern": (["--moe-layer-freq", "([0]+[1])*3+[1,1]"], True),  # the list form (Qwen MoE's mlp_only_layers)
}


def sweep_cases() -> list[tuple[str, list[str], int]]:
    """Random layouts, each with a random set of model and training features on top."""
    layouts = all_layouts()
    rng = random.Random(int(os.environ.get("MEGALITE_SWEEP_SEED", "0")))
    cases = []
    for name, argv, mbs in rng.sample(layouts, min(len(layouts), int(os.environ.get("MEGALITE_SWEEP_CASES", "4")))):
        picked = [f for f, (_, moe_only) in FEATURES.items() if rng.random() < 0.3 and ("_moe_" in name or not moe_only)]
        if "selective" in picked and "full" in picked:
            picked.remove("full")
        extra = [flag for f in picked for flag in FEATURES[f][0]]
        cases.append(("_".join([name, *picked]), argv + extra, mbs))
    return cases


def test_the_sweep_draws_from_many_valid_layouts():
    layouts = all_layouts()
    names = [n for n, _, _ in layouts]
    assert len(set(names)) == len(names) > 1000
    assert any("_moe_" in n and "pp2" in n and "cp2" in n and "tp2sp" in n for n in names)


@pytest.mark.parametrize("case", sweep_cases(), ids=lambda c: c[0])
def test_random_layout_sweep_matches_single_process(case, world_of_one):
    _, argv, mbs = case
    assert_matches_single_process(WORLD, argv, micro_batch_size=mbs)
