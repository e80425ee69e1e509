"""The chunked, pipelined MoE layer step as a schedule: the time of one forward+backward with ``c`` chunks.

It replays, event by event, the order ``moe_ep.dispatch.Dispatcher`` issues and waits for its all-to-alls
(docs/dispatch.md, "Overlap") on three resources a GPU has: its compute, its inter-node link and its
intra-node link. A transfer starts when it is issued and its link is free (one transfer at a time per
link) and takes ``alpha + bytes / bandwidth`` (the caller's per-chunk pass times); compute runs in
program order and waits for what it needs. Per phase:

    forward   send every D(i); for i: wait D(i), [inner hop of i, sent and awaited], E(i),
              [inner combine of i], send C(i); wait every C
    backward  send every combine gradient, last chunk first; for i from the last: wait Cg(i),
              [inner hops], Eb(i), send Dg(i); wait every Dg

(the backward order is the one autograd takes: later chunks' nodes first). ``c = 1`` is the serialized
layer: every transfer exposed. ``benchmarks/project.py`` uses it for the projection with overlap and
``project_fit.validate_overlap`` checks it against ``bench_overlap.py``'s emulated-link runs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    """One direction of a layer, per chunk: the outer (first) hop's pass each way, the inner hop's, the compute."""

    outer_s: float          # one outer all-to-all of one chunk (dispatch or combine; both move the same rows)
    inner_s: float          # one inner (intra-node, two-hop route) all-to-all of one chunk; 0 on the flat route
    compute_s: float        # the chunk's compute between its dispatch and its combine
    outer_link: str = "inter"


class _Links:
    """FIFO links: a transfer issued at ``t`` starts when its link is free."""

    def __init__(self):
        self.free = {"inter": 0.0, "intra": 0.0}

    def send(self, link: str, issued: float, seconds: float) -> float:
        start = max(issued, self.free[link])
        self.free[link] = start + seconds
        return self.free[link]


def _compute_chunk(links: _Links, phase: Phase, now: float) -> float:
    """A chunk's work once its outer hop arrived: [its inner hop], its compute, [its inner combine]."""
    if phase.inner_s:
        now = links.send("intra", now, phase.inner_s)
    now += phase.compute_s
    if phase.inner_s:
        now = links.send("intra", now, phase.inner_s)
    return now


def forward_time(phase: Phase, chunks: int) -> float:
    """Seconds of the forward schedule of the module docstring."""
    links, now = _Links(), 0.0
    dispatched = [links.send(phase.outer_link, now, phase.outer_s) for _ in range(chunks)]
    combined = []
    for i in range(chunks):
        now = _compute_chunk(links, phase, max(now, dispatched[i]))
        combined.append(links.send(phase.outer_link, now, phase.outer_s))
    return max([now] + combined)


def backward_time(phase: Phase, chunks: int) -> float:
    """Seconds of the backward schedule of the module docstring."""
    links, now = _Links(), 0.0
    combined = {i: links.send(phase.outer_link, now, phase.outer_s) for i in reversed(range(chunks))}
    dispatched = {}
    for i in reversed(range(chunks)):
        now = _compute_chunk(links, phase, max(now, combined[i]))
        dispatched[i] = links.send(phase.outer_link, now, phase.outer_s)
    return max([now] + list(dispatched.values()))


def step_time(forward: Phase, backward: Phase, chunks: int) -> float:
    """Forward then backward of one layer with ``chunks`` chunks (the per-chunk times of each phase given)."""
    return forward_time(forward, chunks) + backward_time(backward, chunks)


def split(total_outer_s: float, total_inner_s: float, total_compute_s: float, chunks: int, alpha_outer: float,
          alpha_inner: float, outer_link: str = "inter") -> Phase:
    """A phase whose whole-batch pass times and compute are split into ``chunks`` equal chunks; every chunk's
    all-to-all pays its start-up ``alpha`` again (``total_*_s`` include one alpha each)."""
    per = lambda total, alpha: alpha + max(total - alpha, 0.0) / chunks if total else 0.0  # noqa: E731
    return Phase(per(total_outer_s, alpha_outer), per(total_inner_s, alpha_inner), total_compute_s / chunks,
                 outer_link)
