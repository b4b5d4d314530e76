"""Runs a test function on several gloo ranks in fresh processes (torch.multiprocessing spawn),
with a deadline: a hung collective fails the test instead of hanging it. The workers live in
tests/dist_workers.py so that the spawned processes can import them."""
import os
import tempfile
import time

import torch.multiprocessing as mp


def run_ranks(fn, *args, world=2, timeout=240):
    """fn(rank, world, init_file, *args) on `world` processes; re-raises a worker's exception."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.spawn(_entry, args=(world, init_file, fn, args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout} s")


def _entry(rank, world, init_file, fn, args):
    """One rank: joins the group, runs fn, and ends as `mtp-ext train` does under torchrun
    (mtp_ext.training.distributed: init_process_group, shutdown, end_rank)."""
    import torch
    from mtp_ext.training import distributed as mdist

    torch.set_num_threads(1)  # two ranks on two cores
    mdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=world)
    fn(rank, world, *args)
    mdist.shutdown(mdist.DistContext(rank, world))
    mdist.end_rank(0)
