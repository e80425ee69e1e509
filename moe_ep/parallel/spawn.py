"""Run a function on N local processes in one process group, with a hard timeout.

Used by the test suite and the benchmarks to run expert parallelism on one
machine without torchrun. ``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` processes that
join one group (gloo by default; ``backend="cpu:gloo,cuda:nccl"`` on GPUs, each rank on
``cuda:<rank>``; TCP store on a free loopback port), calls
``fn(rank, world_size, *args)`` in each, and returns the per-rank results.
A rank that raises or dies raises ``AssertionError`` with its traceback; a
hang is killed after ``timeout`` seconds and raises too.
"""
from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, env, backend, args, results):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if "nccl" in backend:
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # report every failure to the parent, then exit
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, timeout: float = 180.0, env: dict | None = None,
                 backend: str = "gloo") -> list:
    """Results of ``fn(rank, world_size, *args)`` on each rank, in rank order.

    Results must be plain Python objects: a tensor's shared memory does not
    outlive the worker process.
    """
    results_queue = _CTX.Queue()
    port = _free_port()
    procs = [_CTX.Process(target=_entry, args=(fn, r, world_size, port, env or {}, backend, args, results_queue),
                          daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, value = results_queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s waiting for ranks: a hang")
                continue
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
