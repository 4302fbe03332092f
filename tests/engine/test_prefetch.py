"""Data prefetch: the prefetcher hands out exactly what a direct read gives, reads the next global batch on its
thread while the caller works, reads an unexpected position on the spot, raises a read's error at the step that asks
for it, and counts the time the caller waited; a training run with prefetch equals one without."""
import re
import threading
import time

import pytest
import torch

from megalite.cli import main
from megalite.engine.prefetch import Prefetcher


class Reader:
    """Global batches [consumed, consumed + 1, ...] as one-tensor 'microbatches', recording who read what."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None):
        self.delay, self.fail_at, self.calls = delay, fail_at, []

    def __call__(self, consumed: int):
        self.calls.append((consumed, threading.current_thread().name))
        time.sleep(self.delay)
        if consumed == self.fail_at:
            raise ValueError(f"bad sample at {consumed}")
        return [{"tokens": torch.arange(consumed, consumed + 4)}]


def test_reads_ahead_on_its_thread_and_equals_direct_reads():
    reader = Reader()
    data = Prefetcher(reader, step=4)
    for consumed in (0, 4, 8):
        assert torch.equal(data.get(consumed, prefetch_next=consumed < 8)[0]["tokens"], reader(consumed)[0]["tokens"])
    data.close()
    fetched = [(c, name.startswith("megalite-prefetch")) for c, name in reader.calls]
    # 0 on the spot; 4 and 8 read ahead on the thread (the direct reads of the check run on the main thread)
    assert [c for c, ahead in fetched if ahead] == [4, 8] and (0, False) in fetched


def test_an_unexpected_position_is_read_on_the_spot():
    reader = Reader()
    data = Prefetcher(reader, step=4)
    data.get(0)
    assert data.get(12)[0]["tokens"][0] == 12  # not the prefetched 4
    data.close()


def test_the_wait_is_counted_and_the_read_overlaps_the_callers_work():
    reader = Reader(delay=0.2)
    data = Prefetcher(reader, step=4)
    data.get(0)
    assert data.take_waited() >= 0.2  # the first read is waited for
    time.sleep(0.3)  # the caller's step: the next read finishes meanwhile
    data.get(4, prefetch_next=False)
    assert data.take_waited() < 0.1
    data.close()
    off = Prefetcher(Reader(delay=0.2), step=4, enabled=False)
    off.get(0)
    time.sleep(0.3)
    off.get(4)
    assert off.take_waited() >= 0.4  # without prefetch every read is waited for


def test_a_read_error_surfaces_at_the_step_that_asks():
    data = Prefetcher(Reader(fail_at=4), step=4)
    data.get(0)
    with pytest.raises(ValueError, match="bad sample at 4"):
        data.get(4)
    data.close()


TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--mock-data", "--train-iters", "6",
        "--log-interval", "3", "--lr", "0.003"]


def test_training_with_prefetch_equals_training_without(world_of_one, capsys):
    def losses(extra):
        assert main(["train", *TINY, *extra]) == 0
        out = capsys.readouterr().out
        assert len(re.findall(r"\| data wait \d+\.\d% \|", out)) == 2
        return re.findall(r"loss (\S+) \|", out)

    assert losses([]) == losses(["--no-data-prefetch"])
