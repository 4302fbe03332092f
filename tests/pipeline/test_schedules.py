"""Pipeline schedules as data: printed lists, stage placement, forward-only lists, and `validate` (which must pass
for every generated schedule and fail for broken ones)."""
import pytest

from megalite.pipeline.actions import Action, Costs, Schedule, ScheduleError
from megalite.pipeline.schedules import SCHEDULES, build_schedule
from megalite.pipeline.validate import execute, peak_activations, validate


def lists(text: str) -> list[list[Action]]:
    """Per-rank action lists from lines `rank r: F0.0 sendF0.0>1 ...`."""
    return [[Action.parse(word) for word in line.split(":")[1].split()] for line in text.strip().splitlines()]


def microbatch_counts(pp: int, name: str) -> list[int]:
    if name == "interleaved":
        return [pp, 2 * pp, 3 * pp]
    return sorted({1, 2, pp, pp + 1, 2 * pp, 2 * pp + 3})


def test_actions_print_compactly_and_parse_back():
    assert str(Action("F", 0, 3)) == "F0.3"
    assert str(Action("W", 1, 2)) == "W1.2"
    assert str(Action("SEND_F", 0, 3, peer=2)) == "sendF0.3>2"
    assert str(Action("RECV_B", 1, 0, peer=3)) == "recvB1.0<3"
    for text in ("F0.3", "B1.12", "W0.0", "sendF0.3>2", "recvF1.0<0", "sendB0.4>1", "recvB1.0<3"):
        assert str(Action.parse(text)) == text
    for text in ("F0", "sendF0.3<2", "recvB1.0>3", "sendW0.1>1", "F0.1>2", "X0.1"):
        with pytest.raises(ValueError):
            Action.parse(text)
    with pytest.raises(ValueError, match="needs peer"):
        Action("SEND_F", 0, 0)


def test_stage_placement_per_schedule():
    one = build_schedule("1f1b", 4, 4)
    assert [one.stage(r, 0) for r in range(4)] == [0, 1, 2, 3]
    interleaved = build_schedule("interleaved", 4, 4, num_chunks=3)
    assert [interleaved.stage(1, c) for c in range(3)] == [1, 5, 9]
    v = build_schedule("zb-v", 4, 8)
    assert [v.stage(r, 0) for r in range(4)] == [0, 1, 2, 3]
    assert [v.stage(r, 1) for r in range(4)] == [7, 6, 5, 4]  # rank 0 holds the first and the last (loss) stage
    for s in (one, interleaved, v):
        assert sorted(s.location(stage) for stage in range(s.num_stages)) == \
            [(r, c) for r in range(s.pp) for c in range(s.num_chunks)]
        assert all(s.stage(*s.location(stage)) == stage for stage in range(s.num_stages))


def test_1f1b_for_2_ranks_and_3_microbatches_is_the_textbook_list():
    assert str(build_schedule("1f1b", 2, 3)) == (
        "rank 0: F0.0 sendF0.0>1 F0.1 sendF0.1>1 recvB0.0<1 B0.0 F0.2 sendF0.2>1 recvB0.1<1 B0.1 recvB0.2<1 B0.2\n"
        "rank 1: recvF0.0<0 F0.0 recvF0.1<0 B0.0 sendB0.0>0 F0.1 B0.1 sendB0.1>0 recvF0.2<0 F0.2 B0.2 sendB0.2>0")


def test_no_pipelining_is_gradient_accumulation():
    schedule = build_schedule("none", 1, 3)
    assert str(schedule) == "rank 0: F0.0 B0.0 F0.1 B0.1 F0.2 B0.2"
    assert not schedule.split_backward


def test_interleaved_follows_megatron_order():
    # Rank 0 warms up with 2(p-1) + (v-1)p = 4 forwards: all of them. Rank 1 with 2, then F and B alternate.
    assert build_schedule("interleaved", 2, 2).format(comm=False) == (
        "rank 0: F0.0 F0.1 F1.0 F1.1 B1.0 B1.1 B0.0 B0.1\n"
        "rank 1: F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 B0.0 B0.1")


def test_zb_h1_keeps_1f1b_order_and_fills_bubbles_with_w():
    # Unit costs: rank 0 idles once, waiting for B0.0 (t=2..3), then must run W0.0 before F0.2 to stay within
    # 1F1B's 2 microbatches; rank 1 runs W0.0 while F0.2 is on its way. Makespan 3m + p - 1 = 10.
    schedule = build_schedule("zb-h1", 2, 3)
    assert schedule.split_backward
    assert schedule.format(comm=False) == (
        "rank 0: F0.0 F0.1 B0.0 W0.0 F0.2 B0.1 W0.1 B0.2 W0.2\n"
        "rank 1: F0.0 B0.0 F0.1 B0.1 W0.0 F0.2 B0.2 W0.1 W0.2")


def test_zb_v_turns_on_the_last_rank_without_messages():
    schedule = build_schedule("zb-v", 2, 2)
    assert schedule.format(comm=False) == (
        "rank 0: F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 B0.0 W0.0 B0.1 W1.0 W0.1 W1.1\n"
        "rank 1: F0.0 F1.0 F0.1 F1.1 B1.0 B0.0 B1.1 B0.1 W0.0 W1.0 W0.1 W1.1")
    last = schedule.actions[1]
    assert all(a.peer == 0 for a in last if a.is_comm)
    assert Action("RECV_F", 1, 0, 0) not in last and Action("RECV_B", 0, 0, 0) not in last  # stage 1 -> 2 is local


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_validates(name):
    checked = 0
    for pp in range(1, 9):
        for m in microbatch_counts(pp, name):
            try:
                schedule = build_schedule(name, pp, m)
            except ValueError:
                assert (name == "none" and pp > 1) or (name == "interleaved" and pp == 1)
                continue
            validate(schedule)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("costs", [Costs(comm=0.3), Costs(b=2.0, w=0.5), Costs(f=1.0, b=1.2, w=0.3, comm=0.05)])
@pytest.mark.parametrize("name", ["zb-h1", "zb-v"])
def test_zero_bubble_schedules_planned_for_other_costs_validate(name, costs):
    for pp, m in [(2, 5), (4, 8), (5, 13), (8, 16)]:
        validate(build_schedule(name, pp, m, costs=costs))


@pytest.mark.parametrize("name, pp, m, chunks, message", [
    ("gpipe", 2, 4, None, "unknown pipeline schedule"),
    ("1f1b", 0, 4, None, "at least 1"),
    ("1f1b", 2, 0, None, "at least 1"),
    ("none", 2, 4, None, "needs pp=1"),
    ("1f1b", 2, 4, 2, "only 'interleaved'"),
    ("zb-v", 2, 4, 3, "2 model chunk"),
    ("interleaved", 1, 4, 2, "pp >= 2"),
    ("interleaved", 2, 4, 1, "at least 2 model chunks"),
    ("interleaved", 4, 6, 2, "multiple of pp"),
])
def test_impossible_combinations_are_rejected(name, pp, m, chunks, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(name, pp, m, chunks)


def broken(text: str, name: str = "1f1b", m: int = 2, split: bool = False) -> Schedule:
    actions = lists(text)
    return Schedule(name, len(actions), m, 1, split, actions)


GOOD_1F1B = """
rank 0: F0.0 sendF0.0>1 F0.1 sendF0.1>1 recvB0.0<1 B0.0 recvB0.1<1 B0.1
rank 1: recvF0.0<0 F0.0 recvF0.1<0 B0.0 sendB0.0>0 F0.1 B0.1 sendB0.1>0
"""


def test_the_hand_written_reference_list_is_valid():
    validate(broken(GOOD_1F1B))


@pytest.mark.parametrize("text, message", [
    (GOOD_1F1B.replace("recvF0.1<0 ", ""), r"F0\.1: its input recvF0\.1<0 does not come before it"),
    (GOOD_1F1B.replace(" sendF0.1>1", ""), "rank 0 sends 1 messages to rank 1, which receives 2"),
    (GOOD_1F1B.replace("recvB0.0<1 B0.0", "B0.0 recvB0.0<1"), r"B0\.0: its input recvB0\.0<1"),
    (GOOD_1F1B.replace("F0.0 sendF0.0>1", "sendF0.0>1 F0.0"), r"sendF0\.0>1: sent before F0\.0"),
    (GOOD_1F1B.replace("sendF0.0>1", "sendF0.0>0"), r"sendF0\.0>0: no such message"),
    (GOOD_1F1B.replace("B0.1 sendB0.1>0", "B0.1 sendB0.1>0 B0.1"), r"B0\.1: appears twice"),
    (GOOD_1F1B.replace("recvF0.0<0 F0.0 recvF0.1<0", "recvF0.1<0 recvF0.0<0 F0.0"),
     r"message 0 from rank 0 to rank 1: sent as sendF0\.0>1, received as recvF0\.1<0"),
    (GOOD_1F1B.replace("B0.1 sendB0.1>0", "W0.1"), "W in a schedule whose B computes the weight gradients"),
    (GOOD_1F1B.replace(" B0.1 sendB0.1>0", ""), r"rank 1 never runs B0\.1"),
    # Rank 0 waits for the gradient of microbatch 0 before sending microbatch 1; rank 1 wants microbatch 1 first.
    ("""
rank 0: F0.0 sendF0.0>1 recvB0.0<1 B0.0 F0.1 sendF0.1>1 recvB0.1<1 B0.1
rank 1: recvF0.0<0 recvF0.1<0 F0.0 B0.0 sendB0.0>0 F0.1 B0.1 sendB0.1>0
""", r"deadlock, blocked for ever: rank 0 at recvB0\.0<1 \(action 2\), rank 1 at recvF0\.1<0 \(action 1\)"),
])
def test_validate_catches_broken_lists(text, message):
    with pytest.raises(ScheduleError, match=message):
        validate(broken(text))


def test_validate_catches_w_before_b():
    text = """
rank 0: F0.0 sendF0.0>1 F0.1 sendF0.1>1 recvB0.0<1 B0.0 W0.0 recvB0.1<1 B0.1 W0.1
rank 1: recvF0.0<0 F0.0 recvF0.1<0 B0.0 sendB0.0>0 W0.0 F0.1 B0.1 sendB0.1>0 W0.1
"""
    validate(broken(text, "zb-h1", split=True))
    with pytest.raises(ScheduleError, match=r"rank 1: W0\.1: before B0\.1"):
        validate(broken(text.replace("B0.1 sendB0.1>0 W0.1", "W0.1 B0.1 sendB0.1>0"), "zb-h1", split=True))
    with pytest.raises(ScheduleError, match=r"rank 0 never runs W0\.1"):
        validate(broken(text.replace(" W0.1\nrank 1", "\nrank 1"), "zb-h1", split=True))


def test_validate_catches_a_send_posted_after_a_receive_in_one_run():
    with pytest.raises(ScheduleError, match="post the sends first"):
        validate(broken(GOOD_1F1B.replace("B0.0 sendB0.0>0 F0.1", "B0.0 recvF0.1<0 sendB0.0>0 F0.1")
                        .replace("F0.0 recvF0.1<0 B0.0", "F0.0 B0.0")))


def test_validate_catches_a_batch_waiting_for_a_send_that_the_peer_receives_too_late():
    # Fine when sends are waited for lazily. But if rank 0's batch {sendF0.1} waits for its send, it waits for rank 1
    # to post recvF0.1, which rank 1 does only after its batch {sendB0.0} completed, which needs rank 0's recvB0.0.
    text = """
rank 0: F0.0 sendF0.0>1 F0.1 sendF0.1>1 F0.2 sendF0.2>1 recvB0.0<1 B0.0 W0.0 recvB0.1<1 B0.1 W0.1 recvB0.2<1 B0.2 W0.2
rank 1: recvF0.0<0 F0.0 B0.0 sendB0.0>0 W0.0 recvF0.1<0 F0.1 B0.1 sendB0.1>0 W0.1 recvF0.2<0 F0.2 B0.2 sendB0.2>0 W0.2
"""
    with pytest.raises(ScheduleError, match=r"deadlock \(batches waiting for their sends\), blocked for ever: "
                                            r"rank 0 at sendF0\.1>1 \(action 3\), rank 1 at sendB0\.0>0"):
        validate(broken(text, "zb-h1", m=3, split=True))


def test_peak_activations_of_1f1b_and_interleaved():
    assert peak_activations(build_schedule("1f1b", 4, 8)) == [4, 3, 2, 1]
    assert peak_activations(build_schedule("1f1b", 4, 2)) == [2, 2, 2, 1]
    # Interleaved warms up with 2(p-1) + (v-1)p + 1 chunk forwards on rank 0: p + (p-1)/v microbatches.
    for pp, v in [(4, 2), (4, 4), (8, 2)]:
        assert peak_activations(build_schedule("interleaved", pp, 4 * pp, v))[0] == pp + (pp - 1) / v


@pytest.mark.parametrize("pp, m", [(2, 8), (4, 8), (4, 16), (8, 32)])
def test_zero_bubble_schedules_hold_no_more_than_1f1b(pp, m):
    one_f_one_b = peak_activations(build_schedule("1f1b", pp, m))
    h1 = build_schedule("zb-h1", pp, m)
    assert peak_activations(h1) == one_f_one_b
    assert peak_activations(h1, until="W") == [pp] * pp
    v = build_schedule("zb-v", pp, m)
    assert peak_activations(v) == peak_activations(v, until="W") == [pp] * pp


@pytest.mark.parametrize("name", SCHEDULES)
def test_forward_only_schedules_validate_and_run_each_f_once_in_microbatch_order(name):
    checked = 0
    for pp, m in [(1, 1), (1, 3), (2, 2), (2, 4), (3, 6), (4, 8), (4, 9)]:
        try:
            full = build_schedule(name, pp, m)
        except ValueError:
            continue
        schedule = build_schedule(name, pp, m, forward_only=True)
        validate(schedule)
        assert schedule.forward_only and not schedule.split_backward
        assert (schedule.num_chunks, schedule.v_shape) == (full.num_chunks, full.v_shape)
        assert peak_activations(schedule) == peak_activations(schedule, until="W") == [0.0] * pp
        for acts in schedule.actions:
            assert {a.kind for a in acts} <= {"F", "SEND_F", "RECV_F"}
            for c in range(schedule.num_chunks):
                assert [a.microbatch for a in acts if a.kind == "F" and a.chunk == c] == list(range(m))
        # Pipelined: with unit costs the step takes m stage forwards plus the first microbatch's way down, which
        # interleaving shortens to (p-1)/v (a chunk takes 1/v of a stage's time) and zb-v's V does not.
        timeline = execute(schedule, lambda a: 1 / schedule.num_chunks)
        fill = (pp - 1) / schedule.num_chunks if name == "interleaved" else pp - 1
        assert max(row[-1][1] for row in timeline) == pytest.approx(m + fill)
        checked += 1
    assert checked >= 2


def test_forward_only_1f1b_sends_each_activation_as_it_is_computed():
    assert str(build_schedule("1f1b", 2, 2, forward_only=True)) == (
        "rank 0: F0.0 sendF0.0>1 F0.1 sendF0.1>1\n"
        "rank 1: recvF0.0<0 F0.0 recvF0.1<0 F0.1")
    assert str(build_schedule("none", 1, 3, forward_only=True)) == "rank 0: F0.0 F0.1 F0.2"


def test_forward_only_zb_v_turns_on_the_last_rank_and_ends_on_the_first():
    assert build_schedule("zb-v", 2, 2, forward_only=True).format(comm=False) == (
        "rank 0: F0.0 F0.1 F1.0 F1.1\n"
        "rank 1: F0.0 F1.0 F0.1 F1.1")


GOOD_FORWARD = """
rank 0: F0.0 sendF0.0>1 F0.1 sendF0.1>1
rank 1: recvF0.0<0 F0.0 recvF0.1<0 F0.1
"""


def forward_only(text: str) -> Schedule:
    actions = lists(text)
    return Schedule("1f1b", len(actions), 2, 1, False, actions, forward_only=True)


@pytest.mark.parametrize("text, message", [
    (GOOD_FORWARD.replace("recvF0.1<0 F0.1", "recvF0.1<0 F0.1 B0.1"), r"rank 1: B0\.1: backward in a forward-only"),
    (GOOD_FORWARD.replace("F0.1 sendF0.1>1", "F0.1 sendF0.1>1 recvB0.0<1"),
     r"rank 0: recvB0\.0<1: backward in a forward-only"),
    (GOOD_FORWARD.replace(" F0.1 sendF0.1>1", ""), r"rank 0 never runs F0\.1"),
    (GOOD_FORWARD.replace("recvF0.0<0 F0.0 recvF0.1<0", "recvF0.1<0 F0.0 recvF0.0<0"),
     r"F0\.0: its input recvF0\.0<0 does not come before it"),
    (GOOD_1F1B, r"rank 0: recvB0\.0<1: backward in a forward-only"),
])
def test_validate_catches_broken_forward_only_lists(text, message):
    validate(forward_only(GOOD_FORWARD))
    with pytest.raises(ScheduleError, match=message):
        validate(forward_only(text))
