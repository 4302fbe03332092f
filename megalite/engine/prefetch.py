"""Data prefetch: the next global batch is read, stacked, sharded and checked on a background thread while the
current step runs (--no-data-prefetch: on the main thread, between steps).

One worker thread, one batch ahead: after handing out the batch starting at sample `consumed`, the prefetcher starts
reading the one at `consumed + global batch size`. A request for any other position (a resumed or skipping caller)
is read on the spot. Reading is local to the rank (no collectives), so the thread never reorders communication; an
error raised while reading (a bad token id, a damaged file) surfaces at the step that asked for the batch. `wait`
reports the seconds the caller spent blocked on data, for the share of step time logged.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from megalite.engine.batches import Batch


class Prefetcher:
    """Global batches by start position, one read ahead on a background thread (see the module docstring)."""

    def __init__(self, read: Callable[[int], list[Batch]], step: int, enabled: bool = True):
        self.read, self.step = read, step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="megalite-prefetch") if enabled else None
        self.pending: tuple[int, Future] | None = None
        self.waited = 0.0
        """Seconds spent waiting for data since the last `take_waited`."""

    def get(self, consumed: int, prefetch_next: bool = True) -> list[Batch]:
        """The global batch starting at sample `consumed`; then (unless `prefetch_next` is false: the last step)
        starts reading the next one."""
        started = time.perf_counter()
        if self.pending is not None and self.pending[0] == consumed:
            batches = self.pending[1].result()
        else:
            self._drop_pending()
            batches = self.read(consumed)
        self.pending = None
        self.waited += time.perf_counter() - started
        if self.pool is not None and prefetch_next:
            self.pending = (consumed + self.step, self.pool.submit(self.read, consumed + self.step))
        return batches

    def take_waited(self) -> float:
        """The seconds waited since the last call, and start counting anew."""
        waited, self.waited = self.waited, 0.0
        return waited

    def _drop_pending(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
            try:
                self.pending[1].result()
            except Exception:  # a read nobody asked for: its error does not concern this step
                pass
            self.pending = None

    def close(self) -> None:
        """Wait for the read in flight (its result unused) and stop the thread."""
        self._drop_pending()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
