"""Timing, peak-memory and machine-description helpers of the layer benchmarks.

* ``interleaved_samples``: every step timed once per round, rounds repeated
  (A, B, C, A, B, C, ...), so load changes on a shared machine hit every
  implementation alike. A sample is the wall time of the step on every rank
  (barrier before and after, ``torch.cuda.synchronize`` on CUDA) and the CPU
  time this process spent in it (all its threads, user + system; on CUDA the
  host's share only): on an oversubscribed CPU machine the wall time mostly
  measures the other jobs, the CPU time much less so.
* ``over_ranks``: element-wise max or mean of per-rank values over the ranks.
* ``phase_shares``: under ``torch.profiler``, the share of a step's wall
  time spent in all-to-all collectives (their issue and wait ops) and in
  labelled expert ranges, as unions of the ops' time intervals.
* ``peak_memory_mb``: memory high-water mark of one call above the level
  before it: on CPU the process RSS (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``, freed heap returned to the OS first with
  ``malloc_trim``), on CUDA ``torch.cuda.max_memory_allocated``. Call
  ``pin_mmap_threshold`` first in a process that measures CPU memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import time
from importlib import metadata
from typing import Callable, Hashable

import torch
import torch.distributed as dist

from layer_impls import BuiltImpl
from moe_ep import half_matmul


# ------------------------------------------------------------------- steps
def forward_only(impl: BuiltImpl) -> None:
    """Inference forward (no autograd graph), modules left in training mode so capacities apply."""
    with torch.no_grad():
        impl.forward()


def forward_backward(impl: BuiltImpl) -> None:
    """Forward, backward with the fixed output gradients, gradients released (``set_to_none``)."""
    torch.autograd.backward(impl.forward(), impl.grad_outputs)
    impl.zero_grad()


# ------------------------------------------------------------------ timing
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds of one ``fn()`` on every rank, CPU seconds this process spent in it).

    The CPU time stops before the closing barrier: waiting for the other
    ranks is not this rank's work.
    """
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    cpu = time.process_time() - cpu
    _synchronize(device)
    return time.perf_counter() - wall, cpu


def interleaved_samples(steps: dict[Hashable, Callable[[], None]], iters: int, warmup: int,
                        device: torch.device) -> dict[Hashable, list[tuple[float, float]]]:
    """``warmup`` untimed rounds, then ``iters`` rounds timing every step once, in dict order:
    ``iters`` (wall, CPU) seconds per step."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    samples = {key: [] for key in steps}
    for _ in range(iters):
        for key, fn in steps.items():
            samples[key].append(timed(fn, device))
    return samples


def over_ranks(values: list[float], op: str) -> list[float]:
    """Element-wise ``max`` or ``mean`` of ``values`` over the ranks (collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (t if op == "max" else t / dist.get_world_size()).tolist()


# ------------------------------------------------------------------ phases
COMM_OPS = ("all_to_all", "alltoall", "moe_ep.a2a_wait")  # names of the all-to-alls' issue ops and waits


def _union_us(ranges: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(ranges):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def phase_shares(fn: Callable[[], None], iters: int, expert_labels: tuple[str, ...],
                 device: torch.device) -> dict[str, float]:
    """Shares of ``iters`` profiled calls' wall time (this rank, from its start to its own end):

        comm    = |union of the all-to-all ops' intervals| / wall   (``COMM_OPS``; waiting for a slower
                  rank inside an all-to-all counts here)
        experts = |union of ranges whose name starts with one of ``expert_labels``| / wall
        rest    = 1 - comm - experts

    Ranks start together (barrier before each call, outside the measured time).
    """
    from torch.profiler import ProfilerActivity, profile

    wall = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            _synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall += time.perf_counter() - start
    events = prof.events()
    span = lambda e: (e.time_range.start, e.time_range.end)  # noqa: E731
    comm = _union_us([span(e) for e in events if any(op in e.name for op in COMM_OPS)]) * 1e-6
    experts = _union_us([span(e) for e in events if e.name.startswith(expert_labels)]) * 1e-6
    return {"comm": comm / wall, "experts": experts / wall, "rest": 1.0 - (comm + experts) / wall}


# ------------------------------------------------------------------ memory
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """glibc: serve every block of ``nbytes`` or more by its own mmap, unmapped when freed.

    By default glibc raises this threshold (up to 32 MiB) whenever such a
    block is freed; freed blocks below it then stay resident in the heap and
    the RSS peak of a step depends on what the process ran before (up to 18 %
    apart between identical runs here). Pinned, the RSS follows the live
    tensors. False where ``mallopt`` is unavailable (not glibc).
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes))


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}: CPU peak memory needs Linux")


def _reset_rss_peak() -> float:
    """Return freed heap to the OS, reset VmHWM to the current RSS; the RSS (MiB)."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)  # glibc: freed pages kept by malloc would hide new allocations
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise RuntimeError(f"cannot reset the RSS high-water mark (/proc/self/clear_refs: {err}); "
                           f"CPU peak memory needs Linux >= 4.0 with a writable /proc") from err
    return _proc_status_mb("VmRSS")


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float:
    """High-water mark of memory during ``fn()`` above the level just before it, MiB."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    base = _reset_rss_peak()
    fn()
    return _proc_status_mb("VmHWM") - base


# ----------------------------------------------------------------- machine
def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (None when absent or unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def bf16_support(device: torch.device) -> str:
    """A sentence saying what bf16 matmuls run on (native matrix units or not)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA sm_{major}{minor}: bf16 tensor cores {'yes' if major >= 8 else 'no'}"
    flags = set((_cpuinfo("flags") or "").split())
    if "amx_bf16" in flags:
        return "CPU has AMX (amx_bf16): bf16 matmuls run on the AMX tile units"
    if "avx512_bf16" in flags:
        return ("CPU has no bf16 matrix units (no AMX); bf16 matmuls use AVX512-BF16 vector dot "
                "products (vdpbf16ps)")
    if half_matmul.upcast(torch.ones(1, dtype=torch.bfloat16)):
        return ("CPU has no bf16 path in oneDNN: torch's bf16 matmul is a scalar fallback (nn.Linear layers: "
                "DeepSpeed, textbook, bounds); moe_ep's experts multiply bf16 in fp32 (moe_ep.half_matmul)")
    return "CPU has no native bf16 arithmetic: oneDNN converts bf16 to fp32 for compute"


def machine_description(device: torch.device) -> dict:
    """What the numbers were measured on (plain values, for JSON)."""
    desc = {"device": device.type, "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(),
            "cpu": _cpuinfo("model name") or platform.processor() or "unknown CPU", "cpu_cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1m": os.getloadavg()[0], "bf16_note": bf16_support(device)}
    if device.type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(device)
    try:
        desc["deepspeed"] = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        desc["deepspeed"] = None
    return desc
