"""Start-up of the default process group: under torchrun (env://) or as a single process."""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import signal
import sys
import tempfile

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The world this process runs in: the initialised default group's, else the launcher's environment (torchrun
    sets WORLD_SIZE), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _local_device(backend: str) -> torch.device | None:
    """NCCL: this process's GPU (LOCAL_RANK), made current; gloo: none."""
    if backend != "nccl":
        return None
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def die_with_launcher() -> None:
    """Under a launcher (torchrun sets LOCAL_RANK), ask the kernel to kill this worker when its parent, the launcher,
    dies (Linux PR_SET_PDEATHSIG): a `kill -9` of torchrun leaves no orphaned workers training on."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the request took effect
        os._exit(1)


def init_distributed(backend: str = "auto", timeout_minutes: float = 10.0) -> tuple[int, int]:
    """Initialise the default group once; return (rank, world size).

    Under torchrun the environment gives rank, world size and rendezvous; a plain `python`/`megalite` process
    becomes a world of one over a private file store. `backend='auto'` picks NCCL when CUDA is available.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    die_with_launcher()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=_local_device(backend))
    else:
        store_file = tempfile.NamedTemporaryFile(prefix="megalite-store-", delete=False).name
        store = dist.FileStore(store_file, 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout,
                                device_id=_local_device(backend))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
