"""Timeline picture of a simulated pipeline schedule: one row per rank, time to the right, one colour per action
kind (F blue, B orange, W green; later model chunks darker), idle time light grey. Written as PNG with zlib and
struct only."""
from __future__ import annotations

import struct
import zlib

from megalite.pipeline.validate import Interval

COLOURS = {"F": (66, 133, 244), "B": (245, 145, 30), "W": (52, 168, 83)}
IDLE = (232, 232, 232)
WHITE = (255, 255, 255)


def encode_png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG from `height` rows of 3 * `width` bytes each."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    if len(rows) != height or any(len(row) != 3 * width for row in rows):
        raise ValueError(f"need {height} rows of {3 * width} bytes for a {width}x{height} RGB picture")
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no filter, no interlace
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows), 9)  # filter type 0 before every row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _shade(colour: tuple[int, int, int], chunk: int, num_chunks: int) -> tuple[int, int, int]:
    """`colour` for chunk 0, darker for later chunks (down to 55% for the last)."""
    factor = 1 - 0.45 * chunk / max(1, num_chunks - 1)
    return tuple(int(c * factor) for c in colour)


def timeline_png(timeline: list[list[Interval]], makespan: float, num_chunks: int, px_per_unit: float = 32,
                 max_width: int = 1600, row_height: int = 20, gap: int = 4) -> bytes:
    """The picture of `timeline` (per rank, (start, end, action) of compute actions) as PNG bytes.

    Time is drawn at `px_per_unit` pixels per unit, less if the picture would be wider than `max_width`; the last
    pixel column of an action wide enough is drawn darker so that neighbouring actions stay apart.
    """
    scale = min(px_per_unit, (max_width - 2 * gap) / max(makespan, 1e-9))
    width = int(round(makespan * scale)) + 2 * gap
    blank = bytes(WHITE) * width
    rows = [blank] * gap
    for intervals in timeline:
        line = bytearray(blank)
        line[3 * gap:3 * (width - gap)] = bytes(IDLE) * (width - 2 * gap)
        for start, end, action in intervals:
            x0, x1 = gap + int(round(start * scale)), gap + int(round(end * scale))
            colour = _shade(COLOURS[action.kind], action.chunk, num_chunks)
            line[3 * x0:3 * x1] = bytes(colour) * (x1 - x0)
            if x1 - x0 >= 3:
                line[3 * (x1 - 1):3 * x1] = bytes(int(c * 0.6) for c in colour)
        rows += [bytes(line)] * row_height + [blank] * gap
    return encode_png(width, len(rows), rows)
