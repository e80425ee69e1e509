"""Uneven all-to-alls of rows over a process group, through c10d, differentiable, issued and awaited apart.

    received = all_to_all(sent)     the j-th block of ``sent`` (``send_counts[j]`` rows) goes to rank j,
                                    the i-th block of ``received`` (``recv_counts[i]`` rows) came from rank i
    d sent   = all_to_all(d received) with the counts swapped                     (the backward)

``exchange`` is the plain call. ``RowExchange`` is the differentiable one in two halves: ``issue(x)``
starts the all-to-all and returns its (still arriving) output, ``wait(pending)`` completes it; a caller may
compute in between. The backward runs in the mirror order: the gradient's all-to-all is started where the
forward waited and completed where the forward issued, so the same computation can run while it is in
flight. On a GPU the collective runs on the communicator's stream; on gloo ``wait`` blocks the host.

Why c10d and not torch's functional collectives (``all_to_all_single_autograd``): their first use imports
``torch._dynamo`` (memory and seconds of first step per rank), and some gloo runs then aborted at exit;
docs/reliability.md has the measurements.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..parallel.links import EmulatedLinks, LinkRoute
from ..parallel.state import ParallelState
from ..parallel.turns import hand_over


WAIT_LABEL = "moe_ep.a2a_wait"  # torch.profiler range of every wait for an all-to-all


def ep_link_route(parallel: ParallelState) -> LinkRoute:
    """The emulated-link route over ``parallel``'s EP group: EP rank d is on this rank's node when
    ``d // ranks_per_node == node_index``; this rank is its EP rank."""
    return LinkRoute(tuple(d // parallel.ranks_per_node == parallel.node_index for d in range(parallel.ep_size)),
                     parallel.ep_rank)


class InFlight:
    """One all-to-all issued and not yet completed; ``wait()`` completes it and returns its output.

    ``emulated``: the emulated links and this exchange's completion time on
    them (``moe_ep.parallel.links``), None when no link is emulated.
    """

    def __init__(self, work: Optional[dist.Work], out: torch.Tensor,
                 emulated: Optional[tuple[EmulatedLinks, float]] = None):
        self._work, self.out, self._emulated = work, out, emulated

    def wait(self) -> torch.Tensor:
        """The output, once arrived. Under ``moe_ep.parallel.turns.taking_turns`` the other party of an
        overlapped pair runs first, while this all-to-all moves."""
        if self._work is not None:
            hand_over()
            with record_function(WAIT_LABEL):
                self._work.wait()
                self._work = None
                if self._emulated is not None:
                    links, deadline = self._emulated
                    links.wait_until(deadline)
        return self.out


def issue_exchange(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup,
                   route: Optional[LinkRoute] = None, label: str = "exchange") -> InFlight:
    """Start the all-to-all of ``x``'s rows (non-differentiable); ``x`` must not change until it completes.

    ``route``: where the destinations are, for the emulated links (``label`` names it in their timeline).
    """
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    emulated = route.deadline(send_counts, recv_counts, row_bytes, label) if route is not None else None
    out = x.new_empty(sum(recv_counts), *x.shape[1:])
    work = dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group, async_op=True)
    return InFlight(work, out, emulated)


def exchange(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup,
             route: Optional[LinkRoute] = None, label: str = "exchange") -> torch.Tensor:
    """The all-to-all of ``x``'s rows, completed (non-differentiable)."""
    return issue_exchange(x, send_counts, recv_counts, group, route, label).wait()


def exchange_counts(send_D: torch.Tensor, group: dist.ProcessGroup, route: Optional[LinkRoute] = None) -> torch.Tensor:
    """Per-destination counts out, per-source counts in (one int64 each)."""
    ones = [1] * send_D.numel()
    return exchange(send_D, ones, ones, group, route, "counts")


class RowExchange:
    """One differentiable all-to-all of rows with fixed counts, issued and awaited separately.

    ``wait(issue(x))`` equals ``exchange(x)`` and carries the gradient back through the swapped
    all-to-all. Use each object for one forward (one issue, one wait). ``route`` and ``label``: as
    ``issue_exchange`` (the backward's exchange is labelled ``label + ".backward"``).
    """

    def __init__(self, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup,
                 route: Optional[LinkRoute] = None, label: str = "exchange"):
        self.send_counts, self.recv_counts, self.group = send_counts, recv_counts, group
        self.route, self.label = route, label
        self.forward_flight: Optional[InFlight] = None
        self.backward_flight: Optional[InFlight] = None

    def issue(self, x: torch.Tensor) -> torch.Tensor:
        return _Issue.apply(x, self)

    def wait(self, pending: torch.Tensor) -> torch.Tensor:
        return _Await.apply(pending, self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.wait(self.issue(x))


class _Issue(torch.autograd.Function):
    """Forward: start the all-to-all. Backward: complete the gradient's all-to-all ``_Await`` started."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ex: RowExchange) -> torch.Tensor:
        ctx.ex = ex
        ex.forward_flight = issue_exchange(x.detach(), ex.send_counts, ex.recv_counts, ex.group, ex.route, ex.label)
        return ex.forward_flight.out

    @staticmethod
    def backward(ctx, d_pending: torch.Tensor):
        ex = ctx.ex
        d_x, ex.backward_flight = ex.backward_flight.wait(), None
        return d_x, None


class _Await(torch.autograd.Function):
    """Forward: complete the all-to-all. Backward: start the gradient's all-to-all (counts swapped)."""

    @staticmethod
    def forward(ctx, pending: torch.Tensor, ex: RowExchange) -> torch.Tensor:
        ctx.ex = ex
        ex.forward_flight.wait()
        ex.forward_flight = None
        return pending

    @staticmethod
    def backward(ctx, d_received: torch.Tensor):
        # The gradient of ``pending`` is ``d_received`` itself: ``_Issue.backward`` takes the all-to-all's result.
        ex = ctx.ex
        ex.backward_flight = issue_exchange(d_received, ex.recv_counts, ex.send_counts, ex.group, ex.route,
                                            ex.label + ".backward")
        return d_received, None
