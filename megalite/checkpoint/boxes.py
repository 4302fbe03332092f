"""Boxes of logical tensors: how a rank's part of a tensor is described independently of the layout (pure).

A logical tensor is a parameter (or an optimizer state of one) as the single-process model holds it, in the view its
`ShardSpec.logical()` gives (e.g. SwiGLU's [gate; up] as [2, ffn, h], the fused QKV rows by query group). Under any
layout a rank holds a box of it: per dimension an offset and a length. A distributed-optimizer segment, a flat range
of a rank's shard, is a list of boxes (`flat_range_boxes`). Saving writes boxes; loading reads, for every box a
rank needs, the parts of the saved boxes that intersect it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megalite.tensor_parallel.sharding import ShardSpec


@dataclass(frozen=True)
class Box:
    """Elements [offsets[i], offsets[i] + shape[i]) in every dimension i."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: Box) -> Box | None:
        """The common part of two boxes of the same tensor, or None."""
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a + n, b + m) for a, n, b, m in zip(self.offsets, self.shape, other.offsets, other.shape))
        if any(h <= low for low, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - low for low, h in zip(lo, hi)))

    def within(self, outer: Box) -> tuple[slice, ...]:
        """Where this box lies inside `outer`, as slices of a tensor holding `outer`."""
        return tuple(slice(a - b, a - b + n) for a, b, n in zip(self.offsets, outer.offsets, self.shape))

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> Box:
        return cls(tuple(int(x) for x in data["offsets"]), tuple(int(x) for x in data["shape"]))


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """Boxes covering elements [start, end) of a row-major tensor of `shape`, in order (at most 2 per dimension)."""
    if start >= end:
        return []
    if len(shape) == 1:
        return [Box((start,), (end - start,))]
    inner = math.prod(shape[1:])
    first, first_at = divmod(start, inner)
    last, last_at = divmod(end, inner)

    def in_row(row: int, lo: int, hi: int) -> list[Box]:
        return [Box((row, *b.offsets), (1, *b.shape)) for b in flat_range_boxes(shape[1:], lo, hi)]

    if first == last:
        return in_row(first, first_at, last_at)
    out = []
    if first_at:
        out += in_row(first, first_at, inner)
        first += 1
    if last > first:
        out.append(Box((first, *[0] * (len(shape) - 1)), (last - first, *shape[1:])))
    if last_at:
        out += in_row(last, 0, last_at)
    return out


def shard_box(spec: ShardSpec) -> tuple[tuple[int, ...], Box]:
    """(the logical shape, this rank's shard as a box of it)."""
    shape, dim = spec.logical()
    if dim is None or spec.size == 1:
        return shape, Box((0,) * len(shape), shape)
    local = shape[dim] // spec.size
    offsets = tuple(spec.rank * local if i == dim else 0 for i in range(len(shape)))
    return shape, Box(offsets, tuple(local if i == dim else n for i, n in enumerate(shape)))


def segment_boxes(spec: ShardSpec, start: int, end: int) -> list[Box]:
    """Elements [start, end) of this rank's shard (flattened) as boxes of the logical tensor."""
    _, mine = shard_box(spec)
    return [Box(tuple(a + b for a, b in zip(box.offsets, mine.offsets)), box.shape)
            for box in flat_range_boxes(mine.shape, start, end)]


def split_flat(values: torch.Tensor, boxes: list[Box]) -> list[torch.Tensor]:
    """A flat tensor covering `boxes` in order, cut into one tensor per box (of the box's shape)."""
    return [part.reshape(box.shape) for part, box in zip(values.split([b.numel for b in boxes]), boxes)]
