"""A pool of gloo ranks kept alive between tests ("fake ranks" on CPU).

`run_distributed(world_size, fn, *args)` runs `fn(*args)` on every rank of a pool of `world_size` processes and
returns each rank's return value, in rank order. Starting ranks costs seconds, so pools are kept per world size and
reused by many tests. Any rank raising, or the call running past its timeout, kills the pool (a fresh one starts
on the next call) and raises `DistributedTestError` with every failing rank's traceback (for a timeout: the stack
each rank was stuck in). Workers die with their parent (PR_SET_PDEATHSIG and a watchdog): no orphans.

Ranks keep their model-parallel process groups between functions (`parallel_state.GROUP_CACHE`): a layout
seen before costs no new gloo groups, which keeps thousands of group creations (and their TCP connects) out of a run.
A function that fails only because gloo could not connect a new group's TCP mesh runs once more on a fresh pool.
"""
from __future__ import annotations

import atexit
import ctypes
import datetime
import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

DEFAULT_TIMEOUT_S = 240.0
"""Longest a single distributed test function may run."""
_GRACE_AFTER_ERROR_S = 3.0
"""After one rank fails, how long the others get to finish or fail before the pool is killed."""


class DistributedTestError(AssertionError):
    """A rank raised or timed out; the message holds each failing rank's traceback."""


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(rank: int, world_size: int, workdir: str, conn: mp.connection.Connection, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    stack_file = open(Path(workdir) / f"stack{rank}.txt", "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(workdir) / "store"), world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    )
    from megalite import parallel_state

    parallel_state.GROUP_CACHE.enable()
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        sys_path, fn, args, kwargs = message
        for p in sys_path:
            if p not in sys.path:
                sys.path.append(p)
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """`world_size` gloo processes waiting for functions to run."""

    def __init__(self, world_size: int, start_timeout_s: float = 120.0):
        self.world_size = world_size
        self.workdir = tempfile.mkdtemp(prefix=f"megalite-pool{world_size}-")
        ctx = mp.get_context("spawn")
        self.conns: list[mp.connection.Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(rank, world_size, self.workdir, child_end, os.getpid()), daemon=True
            )
            proc.start()
            child_end.close()
            self.conns.append(parent_end)
            self.procs.append(proc)
        self._collect([None] * world_size, start_timeout_s, what="start-up")

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list:
        """Run `fn(*args, **kwargs)` on every rank; return the results in rank order."""
        message = (list(sys.path), fn, args, kwargs)
        for conn in self.conns:
            conn.send(message)
        return self._collect([None] * self.world_size, timeout, what=getattr(fn, "__qualname__", repr(fn)))

    def _collect(self, results: list, timeout: float, what: str) -> list:
        pending = dict(enumerate(self.conns))
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            ready = mp.connection.wait(list(pending.values()), timeout=min(1.0, deadline - now))
            for conn in ready:
                rank = self.conns.index(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    status, value = "error", f"rank {rank} died (exit code {self.procs[rank].exitcode})"
                del pending[rank]
                if status == "error":
                    errors[rank] = value
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_ERROR_S)
                else:
                    results[rank] = value
            for rank in list(pending):
                if not self.procs[rank].is_alive():
                    errors[rank] = f"rank {rank} died (exit code {self.procs[rank].exitcode})"
                    del pending[rank]
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_ERROR_S)
        if not pending and not errors:
            return results
        stuck = self._stacks(sorted(pending)) if pending else {}
        self.close(force=True)
        report = [f"{what} failed on {self.world_size} ranks"]
        report += [f"--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())]
        if stuck and not errors:
            report.append(f"timed out after {timeout:.0f} s; ranks {sorted(stuck)} still running")
        report += [f"--- rank {r} was stuck in:\n{stack}" for r, stack in sorted(stuck.items()) if not errors]
        if errors and stuck:
            report.append(f"(ranks {sorted(stuck)} were still waiting, most likely on the failed ranks)")
        raise DistributedTestError("\n".join(report))

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        for r in ranks:
            if self.procs[r].is_alive():
                os.kill(self.procs[r].pid, signal.SIGUSR1)
        time.sleep(0.5)
        stacks = {}
        for r in ranks:
            path = Path(self.workdir) / f"stack{r}.txt"
            stacks[r] = path.read_text() if path.exists() else "(no stack dumped)"
        return stacks

    def close(self, force: bool = False) -> None:
        """Stop every rank: politely, or by killing them with `force`."""
        if not force:
            for conn in self.conns:
                try:
                    conn.send(None)
                except OSError:
                    pass
            for proc in self.procs:
                proc.join(timeout=5)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        shutil.rmtree(self.workdir, ignore_errors=True)


_POOLS: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    """The live pool of `world_size` ranks, started on first use and after a failure."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        try:
            pool = RankPool(world_size)
        except DistributedTestError:  # start-up runs no test code: a failed gloo rendezvous is tried once more
            pool = RankPool(world_size)
        _POOLS[world_size] = pool
    return pool


GLOO_CONNECT_FAILURE = "Gloo connectFullMesh failed"
"""gloo's message when the TCP mesh of a new process group cannot be connected: seen once in CI, inside
`dist.new_group` on a pooled rank, never reproduced. It is the transport, not the code under test."""


def run_distributed(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
                    **kwargs: Any) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return every rank's result in rank order.

    If a rank fails only because gloo could not connect a new group's mesh, `fn` runs once more on a fresh pool
    (the failed pool is gone); any other failure, or the same one twice, is reported."""
    try:
        return get_pool(world_size).run(fn, *args, timeout=timeout, **kwargs)
    except DistributedTestError as e:
        if GLOO_CONNECT_FAILURE not in str(e):
            raise
    return get_pool(world_size).run(fn, *args, timeout=timeout, **kwargs)


@atexit.register
def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
