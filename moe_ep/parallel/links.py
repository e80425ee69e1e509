"""Emulated links: collectives that take the time a real intra- or inter-node link would.

On one machine (loopback gloo) an all-to-all costs almost no wall time, so
any overlap of communication with compute is invisible. Under
``emulated_links(intranode_GBps, internode_GBps, latency_us)`` every
expert-parallel collective of this process completes no earlier than

    start + latency + bytes / bandwidth

where the time model is:

* **bytes**: per link class (intra-node, inter-node), the larger of what
  this rank sends and what it receives over that class in the collective
  (links are full duplex; the collective is done when both directions are).
  Rows a rank sends to itself are a local copy and cost nothing. The class
  of a destination comes from the emulated node layout
  (``ParallelState.nodes``): another rank of the same node is intra-node,
  any rank of another node inter-node.
* **bandwidth**: each class is one link per rank, used one collective at a
  time: a collective's bytes on a class start when the previous
  collective's bytes on that class have finished (a busy-until clock per
  class), so issuing many collectives at once does not multiply the
  bandwidth. The two classes run in parallel.
* **latency**: added once per collective, also to one that moves no bytes.

The real collective still runs; ``wait()`` returns when it has completed and
the deadline has passed. The delay is a sleep until the deadline, taken
only by the thread that waits, when it waits: it uses no CPU, and compute
issued between the start and the wait runs meanwhile. Blocking collectives
(counts, statistics) sleep right after the call. Outside the context (the
default) nothing is delayed.

``emulated_links(...)`` also keeps a timeline: ``links.events`` lists
``(label, issued, begins, ends)`` of every delayed collective
(``time.perf_counter`` seconds: when it was started, when its bytes began to
move after the collectives ahead of it, when it completes), which
``benchmarks/bench_overlap.py`` draws, and
``links.exposed_s`` sums the time waits slept (communication not hidden).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional


@dataclass
class EmulatedLinks:
    """Link speeds and the busy-until clock of each link class (module docstring)."""

    intranode_GBps: float
    internode_GBps: float
    latency_us: float = 0.0
    busy_until: dict = field(default_factory=lambda: {"intra": 0.0, "inter": 0.0})
    events: list = field(default_factory=list)
    exposed_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("intranode_GBps", "internode_GBps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"emulated_links: {name} must be a positive number, got {value!r}")
        if not isinstance(self.latency_us, (int, float)) or isinstance(self.latency_us, bool) \
                or not self.latency_us >= 0:
            raise ValueError(f"emulated_links: latency_us must be a non-negative number, got {self.latency_us!r}")

    def deadline(self, intra_bytes: int, inter_bytes: int, label: str) -> float:
        """When a collective starting now with these bytes per class completes; claims the links until then."""
        now = time.perf_counter()
        begins, done = now, now
        for cls, nbytes, gbps in (("intra", intra_bytes, self.intranode_GBps),
                                  ("inter", inter_bytes, self.internode_GBps)):
            if nbytes:
                start = max(now, self.busy_until[cls])
                self.busy_until[cls] = start + nbytes / (gbps * 1e9)
                if self.busy_until[cls] > done:
                    begins, done = start, self.busy_until[cls]
        end = done + self.latency_us * 1e-6
        self.events.append((label, now, begins, end))
        return end

    def wait_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (``time.perf_counter`` seconds), counting the sleep in ``exposed_s``."""
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
            self.exposed_s += remaining


_ACTIVE: Optional[EmulatedLinks] = None


def active_links() -> Optional[EmulatedLinks]:
    """The links of the innermost ``emulated_links`` context, or None (no delay)."""
    return _ACTIVE


@contextlib.contextmanager
def emulated_links(intranode_GBps: float, internode_GBps: float, latency_us: float = 0.0) -> Iterator[EmulatedLinks]:
    """Delay every expert-parallel collective of this process as the module docstring says, inside the block.

    Every rank should enter it with the same speeds. Yields the
    ``EmulatedLinks`` (its ``events`` is the timeline of the block).
    """
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = EmulatedLinks(intranode_GBps, internode_GBps, latency_us)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


@contextlib.contextmanager
def small_collective(label: str) -> Iterator[None]:
    """Around a blocking collective of a few bytes (statistics, drop scope): under the active links it ends
    no earlier than their latency after it began."""
    links = active_links()
    deadline = links.deadline(0, 0, label) if links is not None else None
    yield
    if deadline is not None:
        links.wait_until(deadline)


@dataclass(frozen=True)
class LinkRoute:
    """Which destinations of a group share this rank's node (``same_node_D``) and this rank's index in it."""

    same_node_D: tuple[bool, ...]
    self_index: int

    def deadline(self, send_counts: list[int], recv_counts: list[int], row_bytes: int,
                 label: str) -> Optional[tuple[EmulatedLinks, float]]:
        """The active links and the completion deadline of an exchange of these rows; None when no link is active."""
        links = active_links()
        if links is None:
            return None
        totals = {True: [0, 0], False: [0, 0]}  # same node -> [sent, received] rows
        for d, (sent, received) in enumerate(zip(send_counts, recv_counts)):
            if d != self.self_index:
                totals[self.same_node_D[d]][0] += sent
                totals[self.same_node_D[d]][1] += received
        return links, links.deadline(max(totals[True]) * row_bytes, max(totals[False]) * row_bytes, label)
