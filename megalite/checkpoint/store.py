"""Boxes of logical tensors on disk: safetensors files and a JSON index; nothing is ever unpickled.

Each rank writes the boxes it owns into one safetensors file (`BoxWriter`); the checkpoint's `index.json` lists, for
every logical tensor, its shape and where each of its boxes is (file, key, offsets, shape, SHA-256 of its bytes). A
reader (`BoxReader`) opens the files lazily (safetensors maps them) and, for any box asked for, copies in the parts of
the stored boxes that intersect it, so a rank reads only the stored items its layout needs; each item is checked
against its checksum the first time it is read, so a flipped byte or a truncated file is refused, never loaded.

Why safetensors and not `torch.distributed.checkpoint`: stock DCP writes its `.metadata` and non-tensor items with
pickle and reads them with `torch.load(weights_only=False)`; replacing its planner, metadata and storage layers to
avoid that leaves little of DCP. safetensors is a plain, well-kept format that Hugging Face models already use, the
JSON index mirrors Hugging Face's `model.safetensors.index.json`, and the same reader serves Hugging Face imports.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megalite.checkpoint.boxes import Box
from megalite.errors import CheckpointError


class BoxWriter:
    """This rank's boxes, saved as one safetensors file."""

    def __init__(self, file_name: str):
        self.file_name = file_name
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict] = {}

    def add(self, name: str, logical_shape: tuple[int, ...], box: Box, tensor: torch.Tensor) -> None:
        """Store `tensor` (shaped like `box`) as that box of the logical tensor `name`."""
        if tuple(tensor.shape) != box.shape:
            raise ValueError(f"{name}: tensor of shape {tuple(tensor.shape)} for a box of shape {box.shape}")
        key = f"{name}@{','.join(map(str, box.offsets))}"
        self.tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        entry = self.entries.setdefault(name, {"shape": list(logical_shape), "boxes": []})
        entry["boxes"].append({"file": self.file_name, "key": key, **box.to_json(),
                               "sha256": checksum(self.tensors[key])})

    def add_raw(self, key: str, tensor: torch.Tensor) -> str:
        """A tensor outside the logical tensors (e.g. this rank's random-number states); returns its checksum."""
        self.tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        return checksum(self.tensors[key])

    def save(self, directory: Path) -> None:
        save_file(self.tensors, str(directory / self.file_name))


def checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (as stored: contiguous, in its dtype)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def merge_entries(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """Every rank's entries as one table: name -> {shape, boxes}; the boxes of a tensor must not overlap."""
    merged: dict[str, dict] = {}
    for part in parts:
        for name, entry in part.items():
            into = merged.setdefault(name, {"shape": entry["shape"], "boxes": []})
            if into["shape"] != entry["shape"]:
                raise RuntimeError(f"{name}: ranks disagree on its shape ({into['shape']} and {entry['shape']})")
            into["boxes"] += entry["boxes"]
    return merged


def sealed_json(index: dict) -> str:
    """`index` as JSON text with a checksum of its own content (checked by `read_sealed_json`)."""
    body = json.dumps(index, sort_keys=True)
    return json.dumps({**index, "checksum": hashlib.sha256(body.encode()).hexdigest()}, indent=1, sort_keys=True)


def read_sealed_json(path: Path, what: str) -> dict:
    """A JSON file written by `sealed_json`, refused if its content does not match its checksum."""
    data = read_json(path, what)
    expected = data.pop("checksum", None)
    if expected != hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest():
        raise CheckpointError(f"{what}: {path} does not match its checksum; the checkpoint is damaged")
    return data


def read_json(path: Path, what: str) -> dict:
    """A JSON file of the checkpoint; anything else (truncated, binary, a pickle) is refused naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is not a readable JSON file ({e.__class__.__name__}: {e}); the "
                          "checkpoint is damaged") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} does not hold a JSON object; the checkpoint is damaged")
    return data


class BoxReader(contextlib.AbstractContextManager):
    """Reads boxes of the logical tensors listed in `tensors` (name -> {shape, boxes}) from files in `directory`."""

    def __init__(self, directory: Path, tensors: dict[str, dict], what: str):
        self.directory, self.tensors, self.what = directory, tensors, what
        self._files: dict[str, object] = {}
        self._verified: set[tuple[str, str]] = set()
        self._stack = contextlib.ExitStack()

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def _file(self, name: str):
        if name not in self._files:
            path = self.directory / name
            try:
                self._files[name] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.what}: {path} is not a valid safetensors file ({e}); the checkpoint is "
                                  "damaged") from e
        return self._files[name]

    def _item(self, file_name: str, key: str, expected: str | None) -> torch.Tensor:
        """A stored item, checked against its checksum the first time it is read."""
        try:
            tensor = self._file(file_name).get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{self.what}: cannot read {key} from {self.directory / file_name} ({e}); the "
                                  "checkpoint is damaged") from e
        if (file_name, key) not in self._verified:
            if expected is None or checksum(tensor) != expected:
                raise CheckpointError(f"{self.what}: {key} in {self.directory / file_name} does not match its "
                                      "checksum; the file is damaged")
            self._verified.add((file_name, key))
        return tensor

    def raw(self, file_name: str, key: str, expected: str) -> torch.Tensor:
        """A tensor stored outside the logical tensors, checked against `expected`."""
        return self._item(file_name, key, expected)

    def read(self, name: str, box: Box, dtype: torch.dtype) -> torch.Tensor:
        """Box `box` of logical tensor `name`, assembled from the stored boxes that intersect it."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.what}: the checkpoint has no tensor {name!r}")
        out = torch.empty(box.shape, dtype=dtype)
        covered = 0
        for stored in self.tensors[name]["boxes"]:
            where = Box.from_json(stored)
            common = where.intersect(box)
            if common is None:
                continue
            item = self._item(stored["file"], stored["key"], stored.get("sha256"))
            if tuple(item.shape) != where.shape:
                raise CheckpointError(f"{self.what}: {stored['key']} in {self.directory / stored['file']} has shape "
                                      f"{tuple(item.shape)}, the index says {where.shape}; the checkpoint is damaged")
            out[common.within(box)] = item[common.within(where)].to(dtype)
            covered += common.numel
        if covered != box.numel:
            raise CheckpointError(f"{self.what}: the checkpoint holds {covered} of the {box.numel} elements of {name} "
                              f"this rank needs (box {box}); it is incomplete")
        return out
