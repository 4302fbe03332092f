"""megalite.comm: byte counting per collective kind and group, and p2p over a subgroup."""
import torch
import torch.distributed as dist

from megalite import comm
from megalite import parallel_state as ps
from megalite.testing import run_distributed


def _ring_and_count():
    groups = ps.initialize_model_parallel(tp=2, cp=2)
    cp_ranks = groups.ranks["cp"]
    me = cp_ranks.index(dist.get_rank())
    nxt, prv = cp_ranks[(me + 1) % 2], cp_ranks[(me - 1) % 2]
    with comm.count_comm() as counter:
        x = torch.full((3, 4), float(dist.get_rank()))
        comm.all_reduce(x, groups.tp)
        got = torch.empty(3, 4)
        comm.wait_all(comm.batch_isend_irecv([(x, nxt)], [(got, prv)], groups.cp), groups.cp)
        out = torch.empty(2, 4)
        comm.all_gather_into_tensor(out, torch.ones(1, 4), groups.tp)
    name = comm.group_name(groups.tp)
    ps.destroy_model_parallel(groups)
    return got[0, 0].item(), dict(counter.bytes), name


def test_counts_bytes_per_kind_and_group_and_p2p_reaches_the_ring_neighbour():
    results = run_distributed(4, _ring_and_count)
    # tp pairs {0,1},{2,3}: all-reduce sums to 1 and 5; cp pairs {0,2},{1,3} exchange those.
    assert [r[0] for r in results] == [5.0, 5.0, 1.0, 1.0]
    got_bytes, tp_name = results[0][1], results[0][2]
    assert tp_name == "tp[0, 1]"
    assert got_bytes[("all_reduce", "tp[0, 1]")] == 48
    assert got_bytes[("send", "cp[0, 2]")] == 48 and got_bytes[("recv", "cp[0, 2]")] == 48
    assert got_bytes[("all_gather", "tp[0, 1]")] == 16


def _timeouts_name_the_group_and_collective():
    """Rank 1 stalls; rank 0's receive and all-reduce (groups with a 3-second timeout) fail naming both."""
    import time

    p2p = ps.initialize_model_parallel(pp=2, timeout_minutes=0.05)
    reduce = ps.initialize_model_parallel(tp=2, timeout_minutes=0.05)
    if dist.get_rank() == 1:
        time.sleep(4)
        return []
    messages = []
    for attempt in (lambda: comm.wait_all(comm.batch_isend_irecv([], [(torch.zeros(2), 1)], p2p.pp), p2p.pp),
                    lambda: comm.all_reduce(torch.zeros(2), reduce.tp)):
        try:
            attempt()
            messages.append("no error")
        except RuntimeError as e:
            messages.append(str(e))
    return messages


def test_a_stalled_rank_times_out_naming_the_group_and_the_collective():
    messages = run_distributed(2, _timeouts_name_the_group_and_collective)[0]
    assert messages[0].startswith("p2p wait on process group pp[0, 1] failed") and "Timed out" in messages[0]
    assert messages[1].startswith("all_reduce on process group tp[0, 1] failed")
