"""The distributed test harness: results per rank, failures and timeouts reported with tracebacks."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from megalite.testing import DistributedTestError, get_pool, run_distributed


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item(), os.getpid()


def _rank_two_raises():
    if dist.get_rank() == 2:
        raise ValueError("broken on purpose")
    dist.barrier()


def _rank_one_hangs():
    if dist.get_rank() == 1:
        time.sleep(60)
    return dist.get_rank()


def _fails_to_connect_once(marker):
    """Rank 0 raises gloo's mesh-connect error the first time (a marker file records it), then works."""
    if dist.get_rank() == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer")
    return _rank_and_sum()


def _fails_once_otherwise(marker):
    if dist.get_rank() == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError("broken once on purpose")
    return dist.get_rank()


def _always_fails_to_connect():
    raise RuntimeError("Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer")


def test_a_gloo_mesh_connect_failure_runs_the_function_once_more_on_a_fresh_pool(tmp_path):
    assert [r for r, *_ in run_distributed(2, _fails_to_connect_once, str(tmp_path / "failed"))] == [0, 1]
    assert (tmp_path / "failed").exists()  # the first run did fail
    with pytest.raises(DistributedTestError, match="connectFullMesh"):  # twice is reported
        run_distributed(2, _always_fails_to_connect)
    with pytest.raises(DistributedTestError, match="broken once on purpose"):  # other errors are not retried
        run_distributed(2, _fails_once_otherwise, str(tmp_path / "other"))


def test_results_come_back_in_rank_order_and_the_pool_is_reused():
    first = run_distributed(4, _rank_and_sum)
    assert [(r, s) for r, s, _ in first] == [(r, 6.0) for r in range(4)]
    second = run_distributed(4, _rank_and_sum)
    assert [pid for *_, pid in first] == [pid for *_, pid in second]


def test_an_exception_on_one_rank_fails_with_its_traceback_and_the_pool_restarts():
    with pytest.raises(DistributedTestError, match=r"(?s)rank 2 raised.*ValueError: broken on purpose"):
        run_distributed(4, _rank_two_raises)
    assert [r for r, *_ in run_distributed(4, _rank_and_sum)] == [0, 1, 2, 3]


def test_a_timeout_fails_with_the_stuck_stack_and_leaves_no_process():
    pool = get_pool(2)
    pids = [p.pid for p in pool.procs]
    with pytest.raises(DistributedTestError, match=r"(?s)timed out.*rank 1 was stuck in.*_rank_one_hangs"):
        run_distributed(2, _rank_one_hangs, timeout=3)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
