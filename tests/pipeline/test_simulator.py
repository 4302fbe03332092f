"""The simulator replays the action lists: bubble and memory figures of the literature, the CLI, the picture."""
import struct
import zlib

import pytest

from megalite.pipeline.actions import Costs
from megalite.pipeline.png import encode_png
from megalite.pipeline.schedules import build_schedule
from megalite.pipeline.simulator import main, simulate


def bubble(name: str, pp: int, m: int, chunks: int | None = None) -> float:
    return simulate(build_schedule(name, pp, m, chunks)).mean_bubble


SIZES = [(2, 2), (2, 8), (3, 6), (4, 4), (4, 8), (4, 16), (6, 12), (8, 8), (8, 32)]


@pytest.mark.parametrize("pp, m", SIZES + [(4, 1), (8, 3)])
def test_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(pp, m):
    assert bubble("1f1b", pp, m) == pytest.approx((pp - 1) / (m + pp - 1))


@pytest.mark.parametrize("pp, m", SIZES)
@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_interleaved_bubble_is_smaller_by_the_number_of_chunks(pp, m, chunks):
    # Narayanan et al.: the warm-up and cool-down shrink to (p-1)/v of a stage's forward and backward, so the
    # bubble, (p-1)/v over m microbatches of work, is (p-1)/(v*m + p-1) of the step.
    assert bubble("interleaved", pp, m, chunks) == pytest.approx((pp - 1) / (chunks * m + pp - 1))


@pytest.mark.parametrize("pp, m", SIZES)
def test_zb_h1_has_a_third_of_1f1b_bubble_at_the_same_peak_memory(pp, m):
    # Each rank idles p-1 passes instead of 1F1B's 3(p-1): the bubble is (p-1)/(3m + p-1).
    sim = simulate(build_schedule("zb-h1", pp, m))
    one_f_one_b = simulate(build_schedule("1f1b", pp, m))
    assert sim.makespan - sim.busy[0] == pytest.approx((one_f_one_b.makespan - one_f_one_b.busy[0]) / 3)
    assert sim.mean_bubble == pytest.approx((pp - 1) / (3 * m + pp - 1))
    assert max(sim.peak_activations) == max(sim.peak_until_w) == max(one_f_one_b.peak_activations) == pp


@pytest.mark.parametrize("pp, m", [(p, m) for p, m in SIZES + [(5, 10), (7, 15), (8, 16)] if m >= 2 * p])
def test_zero_bubble_v_has_no_bubble_for_m_ge_2p(pp, m):
    # The only idle time left is the unavoidable start: rank p-1 cannot begin before p-1 chunk forwards (half a
    # stage each) have run upstream. So every rank idles (p-1)/2 of a stage's forward: the bubble is
    # (p-1)/(6m + p-1), below 1/13 for m >= 2p (and below 0.04 for m >= 4p), at 1F1B's peak memory of p.
    sim = simulate(build_schedule("zb-v", pp, m))
    assert sim.mean_bubble == pytest.approx((pp - 1) / (6 * m + pp - 1))
    assert sim.mean_bubble < 1 / 13 and (m < 4 * pp or sim.mean_bubble < 0.04)
    assert sim.peak_activations == sim.peak_until_w == [pp] * pp


def test_bubbles_order_as_in_the_literature():
    pp, m = 4, 8
    order = [bubble("1f1b", pp, m), bubble("interleaved", pp, m), bubble("zb-h1", pp, m), bubble("zb-v", pp, m)]
    assert order == sorted(order, reverse=True)


def test_unsplit_backward_pays_for_both_gradients():
    costs = Costs(f=1, b=2, w=3)
    for name in ("none", "zb-h1"):
        sim = simulate(build_schedule(name, 1, 2), costs)
        assert sim.busy == [2 * (1 + 2 + 3)] and sim.makespan == 12 and sim.bubble == [0.0]
    assert [round(end - start, 6) for start, end, _ in simulate(build_schedule("zb-v", 1, 1), costs).timeline[0]] \
        == [0.5, 0.5, 1.0, 1.0, 1.5, 1.5]  # a chunk holds half the layers


def test_message_latency_lies_on_the_critical_path():
    # One microbatch through 4 stages: 4 forwards, 4 backwards, 3 hops each way.
    sim = simulate(build_schedule("1f1b", 4, 1), Costs(f=1, b=1, w=1, comm=0.25))
    assert sim.makespan == pytest.approx(4 * 3 + 2 * 3 * 0.25)


def test_zero_bubble_schedules_are_planned_for_the_given_costs():
    costs = Costs(f=1, b=1.5, w=0.5)
    planned = simulate(build_schedule("zb-v", 4, 16, costs=costs), costs)
    unit = simulate(build_schedule("zb-v", 4, 16), costs)
    assert planned.makespan < unit.makespan
    assert planned.mean_bubble < simulate(build_schedule("1f1b", 4, 16), costs).mean_bubble / 2


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking the signature, the chunk CRCs and the pixel data length."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = body
        pos += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    return width, height


def test_encode_png_writes_a_valid_rgb_png():
    rows = [bytes([40 * y, 200, 0]) for y in range(3)]
    assert png_size(encode_png(1, 3, rows)) == (1, 3)
    with pytest.raises(ValueError, match="rows"):
        encode_png(2, 3, rows)


def test_plan_pipeline_prints_all_schedules_and_draws_zb_v(tmp_path, capsys):
    picture = tmp_path / "timeline.png"
    assert main(["--pp", "4", "--microbatches", "8", "--png", str(picture)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:6]}
    assert list(rows) == ["1f1b", "interleaved", "zb-h1", "zb-v"]
    assert rows["1f1b"][1:3] == ["0.273", "33"] and rows["zb-v"][1:3] == ["0.059", "25.5"]
    assert rows["1f1b"][-8:] == ["4", "3", "2", "1", "4", "3", "2", "1"]
    assert "skipped: none" in out and f"timeline of zb-v: {picture}" in out
    width, height = png_size(picture.read_bytes())
    assert height == 4 + 4 * (20 + 4) and width == 4 + round(25.5 * 32) + 4


def test_plan_pipeline_prints_the_actions_of_one_schedule(capsys):
    assert main(["--pp", "2", "--microbatches", "3", "--schedule", "1f1b", "--print-actions", "--png", ""]) == 0
    out = capsys.readouterr().out
    assert "rank 1: recvF0.0<0 F0.0 recvF0.1<0 B0.0 sendB0.0>0" in out and "timeline" not in out


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "interleaved", "--pp", "3", "--microbatches", "4"], "multiple of pp"),
    (["--pp", "0"], "at least 1"),
    (["--b", "0"], "must be positive"),
])
def test_plan_pipeline_rejects_impossible_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--png", ""])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
