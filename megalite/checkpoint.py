"""Save, load and resume: atomic, per-rank shards, every random state, refused across layouts.

Layout of `--save DIR`:
    DIR/iter_0000100/rank00000.pt ...   one file per rank: model shard, optimizer, RNG states, counters
    DIR/iter_0000100/meta.json          layout, model config, flags, iteration
    DIR/latest                          the iteration of the newest complete checkpoint (written last)
A checkpoint is written under `iter_XXXXXXX.tmp` and renamed when every rank has finished: the rename commits it.
Then `latest` is replaced (a temporary file, then a rename). A run killed during a save leaves only the previous
complete checkpoints as `iter_*` directories; leftover `.tmp` directories are ignored and cleaned by the next save.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megalite.arguments import ConfigError
from megalite.tensor_parallel.random import RNGTracker


@dataclass
class TrainState:
    """Counters that resume with the run."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def _iter_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _rng_state(tracker: RNGTracker) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tracker.state_dict(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, tracker: RNGTracker) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tracker.load_state_dict(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str, state: TrainState, model: torch.nn.Module, optimizer, rng: RNGTracker,
                    meta: dict) -> Path:
    """Write this rank's shard (with the model's dropout streams `rng`); all ranks call it together. Returns the
    checkpoint directory."""
    rank = dist.get_rank()
    root_path = Path(root)
    final = _iter_dir(root_path, state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        root_path.mkdir(parents=True, exist_ok=True)
        for stale in root_path.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(rng),
        "state": dataclasses.asdict(state),
    }
    part = tmp / f"rank{rank:05d}.pt.partial"
    torch.save(payload, part)
    os.replace(part, tmp / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root_path / "latest.tmp"
        latest_tmp.write_text(str(state.iteration))
        os.replace(latest_tmp, root_path / "latest")
    dist.barrier()
    return final


def latest_iteration(root: str) -> int | None:
    """The iteration of the newest complete checkpoint under `root`, or None if there is none.

    Complete checkpoints are exactly the `iter_XXXXXXX` directories (the rename is the commit), so a run killed
    after the rename but before `latest` was rewritten still resumes from its newest checkpoint.
    """
    names = [d.name for d in Path(root).glob("iter_*") if d.is_dir() and d.name[5:].isdigit()]
    return max((int(n[5:]) for n in names), default=None)


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


def load_checkpoint(root: str, model: torch.nn.Module, optimizer, rng: RNGTracker, meta: dict, *,
                    load_optim: bool = True, load_rng: bool = True, finetune: bool = False) -> TrainState:
    """Restore this rank's shard of the newest complete checkpoint (and the model's dropout streams into `rng`);
    refuse a different layout or model."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"--load {root}: no complete checkpoint there (no iter_* directory); check the path")
    directory = _iter_dir(Path(root), iteration)
    saved_meta = json.loads((directory / "meta.json").read_text())
    differs = _differences({k: saved_meta[k] for k in ("layout", "model")},
                           {k: meta[k] for k in ("layout", "model")})
    if differs:
        raise ConfigError(
            f"--load {root}: checkpoint {directory.name} was made with a different layout or model:\n  - "
            + "\n  - ".join(differs)
            + "\nrun with the checkpoint's layout and model flags (converting between layouts is not supported yet)"
        )
    path = directory / f"rank{dist.get_rank():05d}.pt"
    if not path.exists():
        raise ConfigError(f"--load {root}: {path} is missing; the checkpoint is incomplete")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    if finetune:
        optimizer.reload_from_model()
        return TrainState()
    if load_optim:
        optimizer.load_state_dict(payload["optimizer"])
    else:
        optimizer.reload_from_model()
    if load_rng:
        _set_rng_state(payload["rng"], rng)
    return TrainState(**payload["state"])
