"""Large fresh CPU buffers on transparent huge pages: one page fault per 2 MiB instead of per 4 KiB.

glibc serves every block of 32 MiB or more (its largest mmap threshold) with a mapping of its own, so each
such buffer is new memory: the first write to every 4 KiB page faults and the kernel zeroes the page before
the write overwrites it. The stacked expert weight gradients (``[E, H, J]``, fresh every backward when the
optimizer sets gradients to None) and the ``[R, J]`` / ``[R, H]`` rows of a long batch are such buffers
(docs/performance.md, "The backward at small batches", measures the fill of a fresh, a reused and a
huge-page buffer).

``empty(shape, like)`` is ``torch.empty`` that, for a CPU buffer of at least ``HUGE_PAGE_MIN_BYTES``,
advises the kernel (``madvise(MADV_HUGEPAGE)``, as PyTorch's own ``THP_MEM_ALLOC_ENABLE=1`` does for every
allocation) to back its 2 MiB-aligned interior with huge pages, one fault per 2 MiB. It is best effort: without Linux's ``madvise`` (other systems, other C libraries) or with transparent huge pages
set to ``never`` it is plain ``torch.empty``; with ``always`` the kernel does this by itself. The memory
is the same (the advice covers only whole 2 MiB pages inside the buffer).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional, Sequence

import torch

HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: from here on every block is fresh memory
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _load_madvise():
    path = ctypes.util.find_library("c")
    madvise = getattr(ctypes.CDLL(path), "madvise", None) if path else None
    if madvise is not None:
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise huge pages for the whole 2 MiB pages inside contiguous ``t``; True when the advice was taken."""
    if _MADVISE is None or t.device.type != "cpu":
        return False
    start = t.data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    return last > first and _MADVISE(first, last - first, _MADV_HUGEPAGE) == 0


def empty(shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.empty(shape)`` on ``like``'s device, in ``dtype`` (default ``like``'s); huge pages for large CPU buffers."""
    out = like.new_empty(tuple(shape), dtype=dtype)
    if out.device.type == "cpu" and out.numel() * out.element_size() >= HUGE_PAGE_MIN_BYTES:
        advise_huge_pages(out)
    return out
