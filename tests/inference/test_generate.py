"""Generation end to end: greedy equals Hugging Face `generate` token for token (Llama and Qwen3-MoE, tiny models built
here), every layout equals the single-process generation (greedy and seeded sampling, tokens, log-probabilities and
the MoE routing record), and seeded sampling is reproducible and keyed by (seed, prompt, sample) alone."""
import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import build_parser, config_from_namespace, parse_args, resolve
from megalite.checkpoint import load_checkpoint
from megalite.checkpoint.flags import model_flags_from_checkpoint
from megalite.engine.setup import setup
from megalite.inference import Request, SamplingParams, generate
from megalite.moe.router import TopKRouter
from megalite.testing import run_distributed
from megalite.testing.hf import make_hf
from megalite.testing.reference import reference_argv
from megalite.training import checkpoint_meta

VOCAB, EOD = 100, 7
PROMPTS = [[5, 17, 3, 44], [9, 1, 60, 2, 33, 81, 12], [70, 8]]


def hf_run(directory: str):
    ns = build_parser().parse_args(["--load", directory, "--micro-batch-size", "1", "--global-batch-size", "1"])
    model_flags_from_checkpoint(ns)
    config, derived = resolve(config_from_namespace(ns), dist.get_world_size())
    run = setup(config, derived, trainable=False)
    load_checkpoint(directory, run, checkpoint_meta(run))
    return run


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_greedy_equals_hugging_face_generate(world_of_one, tmp_path, name):
    hf = make_hf(name, tmp_path, vocab_size=VOCAB)
    run = hf_run(str(tmp_path))
    requests = [Request(p, 10, prompt_id=i) for i, p in enumerate(PROMPTS)]
    ours = generate(run, requests, SamplingParams(temperature=0), EOD)
    for prompt, c in zip(PROMPTS, ours):
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=EOD,
                          pad_token_id=EOD, output_logits=True, return_dict_in_generate=True)
        want = out.sequences[0, len(prompt):].tolist()
        assert c.tokens == want, (c.tokens, want)
        want_logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, want)]
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want_logprobs), rtol=1e-4, atol=1e-4)
        assert c.sampling_logprobs == [0.0] * len(want)  # greedy: the drawn token had probability one
        assert c.finish_reason == ("eod" if want[-1] == EOD else "length")
    ps.destroy_model_parallel(run.groups)


DENSE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "48", "--swiglu", "--vocab-size", str(VOCAB), "--seq-length", "16",
         "--micro-batch-size", "1"]
MOE = ["--num-layers", "2"] + DENSE[2:] + ["--num-experts", "4", "--moe-router-topk", "2",
                                           "--moe-ffn-hidden-size", "16"]
SAMPLED = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=5)
REQUESTS = [Request(p, n, prompt_id=i, sample_index=j)
            for i, (p, n) in enumerate(zip(PROMPTS + [[3, 3, 9], [41]], [6, 3, 5, 1, 4])) for j in range(1)]
"""Five requests: replicas get different counts, and rows finish at different steps."""


def layout_generate(argv: list[str], sampled: bool) -> dict:
    """Greedy (and with `sampled`, seeded sampled) generation of REQUESTS by the model the seed initialises, its
    routers scaled so that routing margins are far above fp32 noise."""
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived, trainable=False)
    with torch.no_grad():
        for m in run.model.modules():
            if isinstance(m, TopKRouter):
                m.weight.mul_(50)
    out = {"greedy": generate(run, REQUESTS, SamplingParams(temperature=0), EOD, batch_size=3, record_routing=True)}
    if sampled:
        out["sampled"] = generate(run, REQUESTS, SAMPLED, EOD, batch_size=2, record_routing=True)
    ps.destroy_model_parallel(run.groups)
    return out


def assert_same(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g.prompt_id, g.sample_index, g.tokens, g.finish_reason) == (w.prompt_id, w.sample_index, w.tokens,
                                                                            w.finish_reason)
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(g.sampling_logprobs), torch.tensor(w.sampling_logprobs),
                                   rtol=1e-5, atol=1e-5)
        assert (g.routed_experts is None) == (w.routed_experts is None)
        if w.routed_experts is not None:
            assert g.routed_experts.shape == (len(w.prompt) + len(w.tokens) - 1, *w.routed_experts.shape[1:])
            assert torch.equal(g.routed_experts, w.routed_experts)


LAYOUTS = {
    "tp2_sp_pp2": (4, DENSE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--pipeline-model-parallel-size", "2"], True),
    "cp2_pp2_zbv": (4, DENSE + ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                "--pipeline-schedule", "zb-v"], False),
    "moe_pp2_ep2_dp2": (4, MOE + ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"], False),
    "moe_launch_tp2_cp4_ep4_etp2": (8, MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                              "--context-parallel-size", "4", "--expert-model-parallel-size", "4",
                                              "--expert-tensor-parallel-size", "2"], True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_generates_what_one_process_does(world_of_one, layout):
    world, argv, sampled = LAYOUTS[layout]
    ref = layout_generate(reference_argv(argv, 1), sampled)
    if "--num-experts" in argv:
        assert all(c.routed_experts is not None and (c.routed_experts >= 0).all() for c in ref["greedy"])
    for result in run_distributed(world, layout_generate, argv, sampled):  # every rank returns every completion
        for kind, completions in result.items():
            assert_same(completions, ref[kind])


def test_seeded_sampling_is_reproducible_and_keyed_by_prompt_and_sample(world_of_one):
    config, derived = resolve(parse_args(reference_argv(DENSE, 1)), 1)
    run = setup(config, derived, trainable=False)
    requests = [Request(PROMPTS[0], 8, prompt_id=0, sample_index=j) for j in range(3)]
    first = generate(run, requests, SAMPLED, EOD)
    again = generate(run, requests[::-1], SAMPLED, EOD, batch_size=1)  # other order, other batches
    assert_same(again, first[::-1])
    assert len({tuple(c.tokens) for c in first}) > 1  # samples of one prompt differ
    other_seed = generate(run, requests, SamplingParams(1.0, 20, 0.9, seed=6), EOD)
    assert [c.tokens for c in other_seed] != [c.tokens for c in first]
    assert all(s <= 0.0 and l <= 0.0 for c in first for s, l in zip(c.sampling_logprobs, c.logprobs))
    ps.destroy_model_parallel(run.groups)
