"""Save, load and resume a run: layout-free, atomic, pickle-free.

Layout of `--save DIR`:
    DIR/iter_0000100/rank00000.safetensors ...  each rank's boxes of the logical tensors it owns, and its RNG states
    DIR/iter_0000100/index.json                  format, counters, layout, model config, flags, optimizer scalars,
                                                 every logical tensor's shape and boxes, every rank's RNG record
    DIR/latest                                   the iteration of the newest complete checkpoint (written last)

What is saved, by logical name (the single-process model's parameter names; see `boxes.py`): every parameter and
persistent buffer (`layers.3.mlp.experts.5.fc1.weight`, one tensor per expert), and per parameter the optimizer's
`optimizer.<name>.exp_avg`, `.exp_avg_sq` and, in bf16/fp16, `.main` (fp32). Each element is written once: by the
first rank of its data-parallel group (and of its TP group when TP ranks hold copies), never by the last stage's
copy of a tied embedding; with the distributed optimizer each rank writes its own segments, split at row boundaries
into boxes. Loading reads, for each rank's parameters and optimizer segments under the current layout, the parts of
the saved boxes it needs: any change of TP, SP, CP, PP, virtual stages, schedule, EP, ETP, DP or the distributed
optimizer loads. Random states are per rank and follow only an unchanged layout; across layouts the dropout streams
are reseeded from --seed (and the caller says so).

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
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from megalite import comm
from megalite.checkpoint.boxes import Box, segment_boxes, shard_box, split_flat
from megalite.checkpoint.hf_config import is_hf_directory
from megalite.checkpoint.hf_tensors import HFReader
from megalite.checkpoint.store import BoxReader, BoxWriter, merge_entries, read_json, read_sealed_json, sealed_json
from megalite.engine.setup import tied_copies
from megalite.optim.optimizer import counted_once
from megalite.tensor_parallel.sharding import get_spec
from megalite.errors import CheckpointError

if TYPE_CHECKING:
    from megalite.engine.setup import Run

FORMAT = "megalite-checkpoint/1"
PARAMETER_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "make_vocab_size_divisible_by", "normalization", "swiglu", "untie_embeddings_and_output_weights",
    "disable_bias_linear", "add_qkv_bias", "qk_layernorm", "num_experts", "moe_layer_freq", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_enable_expert_bias",
    "apply_layernorm_1p",
)
"""Model settings that decide which tensors exist and their shapes: a checkpoint loads only where they agree."""
ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """Counters that resume with the run."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


@dataclass(frozen=True)
class Loaded:
    """What `load_checkpoint` restored: the counters, and whether the random states were (same layout) or the
    dropout streams kept their seeding from --seed (another layout, or --no-load-rng)."""

    state: TrainState
    directory: Path
    rng_restored: bool
    scheduler: dict | None = None
    """The learning-rate schedule the checkpoint was trained with (None for a Hugging Face model)."""


def _iter_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _model_tensors(run: Run) -> list[tuple[str, torch.Tensor]]:
    """(logical name, tensor) of every parameter and persistent buffer of this rank's chunks, each once."""
    seen, out = set(), []
    for chunk in run.chunks:
        for name, t in chunk.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                out.append((name, t))
    return out


def _names(run: Run) -> dict[int, str]:
    return {id(t): name for name, t in _model_tensors(run)}


# ------------------------------------------------------------------------------------------------------------ RNG
def _save_rng(writer: BoxWriter, run: Run) -> dict:
    """This rank's random states: tensors into its file, the rest as JSON."""
    tensors = {"rng/torch": torch.get_rng_state(),
               **{f"rng/tracker/{name}": s for name, s in run.context.rng.state_dict().items()}}
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    checksums = {key: writer.add_raw(key, t) for key, t in tensors.items()}
    version, python_state, python_gauss = random.getstate()
    return {"file": writer.file_name, "tracker": sorted(run.context.rng.states), "checksums": checksums,
            "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(python_state), python_gauss]}


def _load_rng(reader: BoxReader, record: dict, run: Run) -> None:
    def raw(key: str) -> torch.Tensor:
        return reader.raw(record["file"], key, record["checksums"].get(key))

    torch.set_rng_state(raw("rng/torch"))
    run.context.rng.load_state_dict({name: raw(f"rng/tracker/{name}") for name in record["tracker"]})
    if torch.cuda.is_available() and "rng/cuda" in record["checksums"]:
        torch.cuda.set_rng_state(raw("rng/cuda"))
    kind, pos, has_gauss, gauss = record["numpy"]
    np.random.set_state((kind, raw("rng/numpy").numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, python_state, python_gauss = record["python"]
    random.setstate((version, tuple(python_state), python_gauss))


# ----------------------------------------------------------------------------------------------------------- save
def _add_model(writer: BoxWriter, run: Run) -> None:
    copies = {id(p) for p in tied_copies(run.chunks)}
    for name, t in _model_tensors(run):
        if id(t) in copies or not counted_once(t, run.groups):
            continue
        shape, box = shard_box(get_spec(t))
        writer.add(name, shape, box, t.reshape(box.shape))


def _add_optimizer(writer: BoxWriter, run: Run) -> None:
    opt, names = run.optimizer, _names(run)
    for segment, main, counted in zip(opt.segments, opt.main, opt.counted):
        state = opt.adam.state.get(main)
        if not counted or not state:
            continue
        spec = get_spec(segment.param)
        shape, _ = spec.logical()
        boxes = segment_boxes(spec, segment.start, segment.end)
        values = {kind: state[kind] for kind in ADAM_STATES}
        if main.dtype != segment.param.dtype:
            values["main"] = main
        for kind, flat in values.items():
            for box, part in zip(boxes, split_flat(flat.detach(), boxes)):
                writer.add(f"optimizer.{names[id(segment.param)]}.{kind}", shape, box, part)


def _optimizer_scalars(run: Run) -> dict | None:
    opt = run.optimizer
    steps = {int(s["step"]) for s in opt.adam.state.values() if "step" in s}
    if not steps:
        return None
    if len(steps) > 1:
        raise RuntimeError(f"optimizer states at different steps {sorted(steps)}")
    return {"step": steps.pop(), "loss_scale": opt.scaler.scale if opt.scaler else None,
            "clean_steps": opt.scaler.clean_steps if opt.scaler else None}


def save_checkpoint(root: str, state: TrainState, run: Run, meta: dict) -> Path:
    """Write this rank's boxes, its RNG states and (rank 0) the index; all ranks call it together. Returns the
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
    comm.barrier(what="checkpoint save barrier")
    writer = BoxWriter(f"rank{rank:05d}.safetensors")
    _add_model(writer, run)
    if run.optimizer is not None:
        _add_optimizer(writer, run)
    part = {"tensors": writer.entries, "rng": _save_rng(writer, run)}
    writer.save(tmp)
    (tmp / f"rank{rank:05d}.json").write_text(json.dumps(part))
    comm.barrier(what="checkpoint save barrier")
    if rank == 0:
        parts = [read_json(tmp / f"rank{r:05d}.json", "save") for r in range(dist.get_world_size())]
        index = {"format": FORMAT, "state": dataclasses.asdict(state), **meta,
                 "optimizer": _optimizer_scalars(run) if run.optimizer is not None else None,
                 "tensors": merge_entries([p["tensors"] for p in parts]),
                 "rng": {str(r): p["rng"] for r, p in enumerate(parts)}}
        (tmp / "index.json").write_text(sealed_json(index))
        for r in range(len(parts)):
            (tmp / f"rank{r:05d}.json").unlink()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root_path / "latest.tmp"
        latest_tmp.write_text(str(state.iteration))
        os.replace(latest_tmp, root_path / "latest")
    comm.barrier(what="checkpoint save barrier")
    return final


# ----------------------------------------------------------------------------------------------------------- load
def latest_iteration(root: str) -> int | None:
    """The iteration of the newest complete checkpoint under `root`, or None if there is none.

    Complete checkpoints are exactly the `iter_XXXXXXX` directories (the rename is the commit), so a run killed
    after the rename but before `latest` was rewritten still resumes from its newest checkpoint. A `latest` file that
    is not an iteration number is refused (it is written atomically, so it is never half written)."""
    latest = Path(root) / "latest"
    if latest.is_file():
        text = latest.read_bytes()
        if not text.strip().isdigit():
            raise CheckpointError(f"--load {root}: {latest} does not hold an iteration number; the checkpoint directory "
                              "is damaged")
    names = [d.name for d in Path(root).glob("iter_*") if d.is_dir() and d.name[5:].isdigit()]
    return max((int(n[5:]) for n in names), default=None)


def _check_model(index: dict, meta: dict, where: str) -> None:
    saved, current = index.get("model", {}), meta["model"]
    differs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
               for k in PARAMETER_FIELDS if saved.get(k) != current.get(k)]
    if differs:
        raise CheckpointError(f"--load {where}: the checkpoint holds another model:\n  - " + "\n  - ".join(differs)
                          + "\nrun with the checkpoint's model flags")


def read_index(directory: Path, where: str) -> dict:
    """The index of a checkpoint directory, checked for its format (old per-rank .pt checkpoints are refused)."""
    if not (directory / "index.json").exists():
        if list(directory.glob("rank*.pt")):
            raise CheckpointError(f"--load {where}: {directory.name} is an old per-rank checkpoint (rank*.pt files, "
                              "readable only by unpickling them); this megalite reads only its layout-free format. "
                              "Retrain, or load it with the megalite that wrote it and save again.")
        raise CheckpointError(f"--load {where}: {directory} has no index.json; the checkpoint is incomplete")
    index = read_sealed_json(directory / "index.json", f"--load {where}")
    if index.get("format") != FORMAT:
        raise CheckpointError(f"--load {where}: {directory / 'index.json'} has format {index.get('format')!r}; "
                          f"this megalite reads {FORMAT!r}")
    return index


def _load_model(reader: BoxReader | HFReader, run: Run) -> None:
    with torch.no_grad():
        for name, t in _model_tensors(run):
            shape, box = shard_box(get_spec(t))
            if reader.has(name) and reader.shape(name) != shape:
                raise CheckpointError(f"{reader.what}: {name} has shape {reader.shape(name)} in the checkpoint, "
                                  f"{shape} in this model")
            t.copy_(reader.read(name, box, t.dtype).reshape(t.shape))


def _load_optimizer(reader: BoxReader, run: Run, scalars: dict) -> None:
    opt, names = run.optimizer, _names(run)
    with torch.no_grad():
        for segment, main in zip(opt.segments, opt.main):
            spec, name = get_spec(segment.param), names[id(segment.param)]
            boxes = segment_boxes(spec, segment.start, segment.end)

            def flat(kind: str) -> torch.Tensor:
                return torch.cat([reader.read(f"optimizer.{name}.{kind}", b, torch.float32).reshape(-1)
                                  for b in boxes]).to(main.device)

            opt.adam.state[main] = {"step": torch.tensor(float(scalars["step"])),
                                    **{kind: flat(kind) for kind in ADAM_STATES}}
            if main.dtype != segment.param.dtype:
                main.copy_(flat("main") if reader.has(f"optimizer.{name}.main") else
                           segment.param.detach().reshape(-1)[segment.start:segment.end].float())
    if opt.scaler is not None and scalars["loss_scale"] is not None:
        opt.scaler.scale, opt.scaler.clean_steps = scalars["loss_scale"], scalars["clean_steps"]


def intact_iterations(root: str, but: int | None = None) -> list[int]:
    """The complete iterations under `root` (other than `but`) whose index is intact."""
    out = []
    for d in sorted(Path(root).glob("iter_*")):
        if d.is_dir() and d.name[5:].isdigit() and int(d.name[5:]) != but:
            try:
                read_index(d, root)
            except CheckpointError:
                continue
            out.append(int(d.name[5:]))
    return out


def load_checkpoint(root: str, run: Run, meta: dict, *, load_optim: bool = True, load_rng: bool = True,
                    finetune: bool = False, step: int | None = None) -> Loaded:
    """Restore this rank's part of the newest complete checkpoint (or of iteration `step`) under the current layout;
    refuse another model, or a damaged checkpoint naming the file and the intact other iterations. `root` may also be
    a Hugging Face model directory: its weights are read (each rank its slices), the optimizer starts from them and
    the counters from zero."""
    if is_hf_directory(root):
        with HFReader(Path(root), run.config.model) as reader:
            _load_model(reader, run)
        if run.optimizer is not None:
            run.optimizer.reload_from_model()
        return Loaded(TrainState(), Path(root), False)
    iteration = latest_iteration(root) if step is None else step
    if iteration is None:
        raise CheckpointError(f"--load {root}: no complete checkpoint there (no iter_* directory); check the path")
    if not _iter_dir(Path(root), iteration).is_dir():
        raise CheckpointError(f"--ckpt-step {iteration}: --load {root} has no such checkpoint; it has iterations "
                              f"{intact_iterations(root) or 'none'}")
    try:
        return _load(root, iteration, run, meta, load_optim and not finetune, load_rng and not finetune, finetune)
    except CheckpointError as e:
        others = intact_iterations(root, but=iteration)
        hint = (f"intact earlier checkpoints: {', '.join(map(str, others))}; load one with --ckpt-step N"
                if others else "no other intact checkpoint there")
        raise CheckpointError(f"{e}\n{hint}") from e


def _load(root: str, iteration: int, run: Run, meta: dict, load_optim: bool, load_rng: bool,
          finetune: bool) -> Loaded:
    directory = _iter_dir(Path(root), iteration)
    index = read_index(directory, root)
    _check_model(index, meta, root)
    same_layout = index.get("layout") == meta["layout"]
    with BoxReader(directory, index["tensors"], f"--load {root}") as reader:
        _load_model(reader, run)
        optimizer = run.optimizer
        if optimizer is not None and load_optim and index.get("optimizer") is not None:
            _load_optimizer(reader, run, index["optimizer"])
        elif optimizer is not None:
            optimizer.reload_from_model()
        restore_rng = load_rng and same_layout
        if restore_rng:
            _load_rng(reader, index["rng"][str(dist.get_rank())], run)
    state = TrainState() if finetune else TrainState(**index["state"])
    return Loaded(state, directory, restore_rng, index.get("scheduler"))


def read_logical_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every logical tensor of a checkpoint directory, whole (tests, conversion)."""
    index = read_index(directory, str(directory))
    with BoxReader(directory, index["tensors"], str(directory)) as reader:
        out = {}
        for name, entry in index["tensors"].items():
            shape = tuple(entry["shape"])
            first = entry["boxes"][0]
            stored = reader.raw(first["file"], first["key"], first.get("sha256"))
            out[name] = reader.read(name, Box((0,) * len(shape), shape), stored.dtype)
        return out
