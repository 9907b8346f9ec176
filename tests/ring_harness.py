"""Run a function on W CPU processes joined by a gloo process group (torch.multiprocessing, spawn),
for the distributed tests. Not a test module: the workers live here so that spawned processes can
import them.

Failures raise instead of hanging: the process group has a timeout (a rank waiting on a peer that
died raises), and run_ranks kills every process and raises once its own deadline passes.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, group_timeout: float = 60.0) -> None:
    """fn(rank, world_size, *args) on `world_size` processes; re-raises the first failure (with the
    rank's traceback), or TimeoutError after `timeout` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        context = mp.start_processes(_entry, args=(fn, world_size, store, group_timeout, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout} s")
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()


def _entry(rank, fn, world_size, store, group_timeout, args):
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=group_timeout))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
