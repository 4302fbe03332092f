"""Workers die with their launcher: a `kill -9` of torchrun itself leaves no worker training on, orphaned."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killing_torchrun_kills_its_workers(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "megalite", "train", "--mock-data",
         "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
         "--micro-batch-size", "1", "--train-iters", "1000000", "--log-interval", "1",
         "--distributed-backend", "gloo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in launcher.stdout:  # wait until the workers train
            if "| loss " in line:
                break
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    finally:
        for w in _children(launcher.pid):
            os.kill(w, signal.SIGKILL)
        launcher.kill()
