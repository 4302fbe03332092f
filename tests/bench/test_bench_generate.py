"""`megalite bench generate` runs end to end on tiny lengths: the plain decode loop and Hugging Face generate produce
megalite's tokens (the benchmark stops otherwise), the table has a row per model and batch, and the KV cache's bytes
per token equal the formula."""
from megalite.bench import generate as bench


def test_bench_generate_runs_and_checks_its_baselines(world_of_one, capsys):
    assert bench.main(["--batch-sizes", "1", "3", "--prompt-len", "5", "--new-tokens", "3", "--iters", "1",
                       "--warmup", "0", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| dense") or line.startswith("| moe")]
    assert len(rows) == 4 and all(line.count("|") == 11 and " - " not in line for line in rows)
    assert out.count("(equal)") == 2  # dense and MoE: 2 x layers x K/V heads x head dim x 4 bytes


def test_plain_decoder_is_an_independent_greedy_reference(world_of_one):
    import torch

    from megalite import parallel_state as ps
    from megalite.inference import Request, SamplingParams, generate

    run = bench.build("moe")
    plain = bench.PlainDecoder({n: p.detach() for n, p in run.chunks[0].state_dict().items()}, run.config.model)
    prompts = torch.randint(0, 257, (2, 7), generator=torch.Generator().manual_seed(1))
    ours = generate(run, [Request(p.tolist(), 5, i) for i, p in enumerate(prompts)], SamplingParams(0), -1)
    assert plain.generate(prompts, 5).tolist() == [c.tokens for c in ours]
    ps.destroy_model_parallel(run.groups)
