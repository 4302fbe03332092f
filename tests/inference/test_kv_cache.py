"""Decoding with the KV cache gives the logits of a full forward over the whole sequence (fp32, rel 1e-5): dense
MHA and GQA, MoE (on inputs checked to be away from routing ties), prompts of different lengths in one batch, and
decode calls over a subset of the cache rows."""
import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.engine.setup import setup
from megalite.inference import CacheStep, KVCache, generation_mode
from megalite.moe.router import TopKRouter

VOCAB = 100
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "48",
        "--vocab-size", str(VOCAB), "--seq-length", "32", "--swiglu", "--micro-batch-size", "1",
        "--global-batch-size", "1"]
MODELS = {
    "mha": BASE,
    "gqa": BASE + ["--num-query-groups", "2", "--qk-layernorm", "--add-qkv-bias"],
    "moe": BASE + ["--num-query-groups", "1", "--num-experts", "4", "--moe-router-topk", "2",
                   "--moe-ffn-hidden-size", "16", "--moe-shared-expert-intermediate-size", "16"],
}
PROMPTS = [5, 9, 3]
"""Prompt lengths of the batch's rows; each row then decodes DECODE tokens, teacher-forced."""
DECODE = 4


def build(argv: list[str]):
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived, trainable=False)
    g = torch.Generator().manual_seed(107)  # a seed whose routing margins are all > 1e-5 here
    with torch.no_grad():  # larger router weights: routing margins well above fp32 noise
        for m in run.model.modules():
            if isinstance(m, TopKRouter):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return run


def routing_margins(run) -> list[float]:
    """A hook on every router: the smallest gap between the k-th and (k+1)-th score of any token it routes."""
    gaps: list[float] = []

    def hook(router, inputs, _):
        scores = torch.softmax(inputs[0].float() @ router.weight.float().t(), dim=-1)
        top = scores.topk(router.topk + 1, dim=-1).values
        gaps.append(float((top[:, -2] - top[:, -1]).min()))

    for m in run.model.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(hook)
    return gaps


@pytest.mark.parametrize("name", MODELS)
def test_cached_decode_equals_full_forward(world_of_one, name):
    run = build(MODELS[name])
    model = run.chunks[0]
    margins = routing_margins(run)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, VOCAB, (p + DECODE,), generator=g) for p in PROMPTS]
    with generation_mode(run):
        full = [model(s.unsqueeze(0))[0] for s in sequences]  # [len, V] each
        layers = {i: (l.attention.num_groups, l.attention.head_dim) for i, l in model.layers.items()}
        cache = KVCache.allocate({int(i): v for i, v in layers.items()}, len(PROMPTS), max(PROMPTS) + DECODE,
                                 torch.float32, torch.device("cpu"))
        got = [[] for _ in PROMPTS]
        for row, (p, s) in enumerate(zip(PROMPTS, sequences)):
            step = CacheStep(cache, [0], [row], all_logits=True)
            got[row].append(model(s[:p].unsqueeze(0), step.positions(p), cache=step)[0])
        fed = list(PROMPTS)  # tokens each row has read
        for t in range(DECODE):
            # every row on even steps (rows=None); on odd steps rows 2 and 0, in that order
            rows = list(range(len(PROMPTS))) if t % 2 == 0 else [2, 0]
            step = CacheStep(cache, [fed[r] for r in rows], None if t % 2 == 0 else rows)
            tokens = torch.stack([sequences[r][fed[r]] for r in rows]).unsqueeze(1)
            logits = model(tokens, step.positions(1), cache=step)
            for j, r in enumerate(rows):
                got[r].append(logits[j])
                fed[r] += 1
    assert fed == [PROMPTS[0] + DECODE, PROMPTS[1] + DECODE // 2, PROMPTS[2] + DECODE]
    for row, n in enumerate(fed):
        torch.testing.assert_close(torch.cat(got[row]), full[row][:n], rtol=1e-5, atol=1e-5)
    if name == "moe":
        assert min(margins) > 1e-5, margins  # 100x the fp32 noise of a probability: no expert can flip
    ps.destroy_model_parallel(run.groups)
