"""Run the shared experts beside the dispatch: a second CUDA stream, plain calls on CPU.

The dispatchers call ``overlap()`` right after issuing the token all-to-all,
so on a GPU the shared experts' kernels run while the rows are in flight.
With NCCL the all-to-all already runs on its own stream; putting the shared
experts on a side stream as well lets them also overlap the routed experts'
kernels queued behind the all-to-all on the current stream.

    launch(fn, x):  the side stream first waits for the current stream (x is
                    ready), then runs fn(x); x is recorded on the side stream
                    so the allocator does not reuse it early.
    join(out):      the current stream waits for the side stream before out
                    is read; out is recorded on the current stream.

Autograd runs each backward op on the stream of its forward op and inserts
the waits between streams itself, so the backward needs nothing more.
"""
from __future__ import annotations

from typing import Callable

import torch


class SideStream:
    """One side stream per CUDA device, created on first use."""

    def __init__(self):
        self._streams: dict[torch.device, "torch.cuda.Stream"] = {}

    def launch(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return fn(x)
        main = torch.cuda.current_stream(x.device)
        side = self._streams.setdefault(x.device, torch.cuda.Stream(x.device))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = fn(x)
        x.record_stream(side)
        return out

    def join(self, out: torch.Tensor) -> torch.Tensor:
        if not out.is_cuda:
            return out
        torch.cuda.current_stream(out.device).wait_stream(self._streams[out.device])
        out.record_stream(torch.cuda.current_stream(out.device))
        return out
