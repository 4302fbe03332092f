"""`megalite convert`: Hugging Face model directory <-> megalite checkpoint, on one process, tensor by tensor.

    megalite convert --from-hf HF_DIR --save CKPT     # prints the model flags that load CKPT
    megalite convert --load CKPT --to-hf HF_DIR       # safetensors + config.json (+ tokenizer files)

Import writes a megalite checkpoint at iteration 0 without optimizer state (a run that loads it starts its optimizer
from the weights) and keeps the tokenizer files beside it. Export writes what `transformers.AutoModelForCausalLM`
loads. A training run can also load a Hugging Face directory directly: `megalite train --load HF_DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from megalite.checkpoint.boxes import Box
from megalite.checkpoint.hf_config import architecture_for, flags_of, hf_config, model_fields, read_hf_config
from megalite.checkpoint.hf_tensors import HFReader, to_hf
from megalite.checkpoint.state import FORMAT, read_index, read_logical_tensors
from megalite.checkpoint.store import BoxWriter, sealed_json
from megalite.config import ModelConfig
from megalite.errors import CheckpointError, ConfigError
from megalite.parser import Parser

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SHARD_BYTES = 4 << 30
"""A checkpoint file is closed when it holds this much."""


def hf_model_config(directory: Path) -> tuple[ModelConfig, dict]:
    """The megalite model of a Hugging Face directory, and the fields config.json set."""
    fields = model_fields(read_hf_config(directory), str(directory / "config.json"))
    return ModelConfig(**fields), fields


def import_hf(directory: Path, save: Path) -> list[str]:
    """Write the Hugging Face model in `directory` as a megalite checkpoint under `save`; returns its model flags."""
    model, fields = hf_model_config(directory)
    final = save / "iter_0000000"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = [BoxWriter("rank00000.safetensors")]
    size = 0
    with HFReader(directory, model) as reader:
        for name, source in reader.tensors.items():
            whole = Box((0,) * len(source.shape), source.shape)
            tensor = reader.read(name, whole, reader.dtype(name))
            if size and size + tensor.numel() * tensor.element_size() > SHARD_BYTES:
                writers.append(BoxWriter(f"rank00000-{len(writers):03d}.safetensors"))
                size = 0
            writers[-1].add(name, source.shape, whole, tensor)
            size += tensor.numel() * tensor.element_size()
    for writer in writers:
        writer.save(tmp)
    entries: dict[str, dict] = {}
    for writer in writers:
        entries |= writer.entries
    index = {"format": FORMAT, "state": {"iteration": 0, "consumed_samples": 0, "skipped_steps": 0},
             "layout": {"converted_from": str(directory)}, "model": dataclasses.asdict(model),
             "args": flags_of(fields), "optimizer": None, "tensors": entries, "rng": {}}
    (tmp / "index.json").write_text(sealed_json(index))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (save / "latest").write_text("0")
    _copy_tokenizer(directory, save / "tokenizer")
    return flags_of(fields)


def export_hf(load: Path, target: Path) -> str:
    """Write the newest checkpoint under `load` as a Hugging Face directory `target`; returns the architecture."""
    iterations = sorted(p for p in load.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    if not iterations:
        raise CheckpointError(f"--load {load}: no complete checkpoint there (no iter_* directory)")
    index = read_index(iterations[-1], str(load))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in index["model"].items() if k in known})
    arch = architecture_for(model)
    logical = {k: v for k, v in read_logical_tensors(iterations[-1]).items() if not k.startswith("optimizer.")}
    tensors = to_hf(logical, model)
    dtype = next(iter(tensors.values())).dtype
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model, str(dtype).removeprefix("torch."))
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _copy_tokenizer(load / "tokenizer", target)
    return arch


def _copy_tokenizer(source: Path, target: Path) -> None:
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if files:
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)


def main(argv: list[str]) -> int:
    parser = Parser(prog="megalite convert", description=__doc__.splitlines()[0])
    parser.add_argument("--from-hf", type=Path, help="a Hugging Face model directory to import")
    parser.add_argument("--save", type=Path, help="where to write the imported megalite checkpoint")
    parser.add_argument("--load", type=Path, help="a megalite checkpoint directory to export")
    parser.add_argument("--to-hf", type=Path, help="where to write the Hugging Face model")
    args = parser.parse_args(argv)
    if args.from_hf and args.save and not (args.load or args.to_hf):
        flags = import_hf(args.from_hf, args.save)
        print(f"wrote {args.save / 'iter_0000000'}; load it with these model flags:\n  {' '.join(flags)}")
        tokenizer = args.save / "tokenizer" / "tokenizer.json"
        if tokenizer.is_file():
            print(f"  --tokenizer-type HuggingFaceTokenizer --tokenizer-model {tokenizer}")
    elif args.load and args.to_hf and not (args.from_hf or args.save):
        print(f"wrote {args.to_hf} ({export_hf(args.load, args.to_hf)})")
    else:
        raise ConfigError("megalite convert: give --from-hf DIR --save CKPT, or --load CKPT --to-hf DIR")
    return 0
