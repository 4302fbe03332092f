"""One MoE GPT training step in a process of its own, for table 2 of `megalite bench moe`.

`megalite bench moe` runs this file's text with `python -c`, once with this megalite tree first on the path and
once with a baseline tree (another checkout, e.g. the code before issue 17), and alternates steps between the two
processes. So the file imports only what every megalite since the step engine has had: `arguments.parse_args` and
`resolve`, `engine.setup.setup`, `engine.step.forward_backward` and `optimizer_step`, `distributed.init_distributed`.

Arguments: the `megalite train` flags of the model (JSON list), the seed of the token batch, torch CPU threads (0:
torch's default). Protocol on stdout, one line each: `tree PATH` (the megalite imported), `loss X` (the first step's
loss); then every `step` line on stdin runs one step (zero gradients, forward + backward, AdamW) and answers `done`.
Anything megalite prints goes to stderr.
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    flags, seed, threads = json.loads(argv[0]), int(argv[1]), int(argv[2])
    protocol, sys.stdout = sys.stdout, sys.stderr
    import torch

    import megalite
    from megalite.arguments import parse_args, resolve
    from megalite.distributed import init_distributed
    from megalite.engine.setup import setup
    from megalite.engine.step import forward_backward, optimizer_step

    if threads > 0:
        torch.set_num_threads(threads)
    init_distributed("gloo")
    config, derived = resolve(parse_args(flags), 1)
    run = setup(config, derived)
    model, train = config.model, config.training
    data = torch.randint(0, model.vocab_size, (train.micro_batch_size, model.seq_length + 1),
                         generator=torch.Generator().manual_seed(seed))
    batches = [{"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": torch.ones(data[:, 1:].shape)}]

    def step() -> float:
        run.reducer.zero_grad()
        loss = forward_backward(run, batches).loss
        optimizer_step(run, train.lr)
        return loss

    print(f"tree {megalite.__file__}", file=protocol, flush=True)
    print(f"loss {step()!r}", file=protocol, flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            raise SystemExit(f"moe_worker: unknown command {line.strip()!r}")
        step()
        print("done", file=protocol, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
