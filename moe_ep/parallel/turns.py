"""Two computations of one process that take turns at their all-to-alls: DualPipeV's overlapped step.

DeepSeek-V3 overlaps the forward of one micro-batch with the backward of
another: while one waits for its all-to-all, the other computes. Here the
two run as two parties of a ``Turns``, each on its own thread, and exactly
one of them runs at a time. A party runs until it is about to wait for an
all-to-all it has issued (``moe_ep.dispatch.exchange.InFlight.wait`` calls
``hand_over()``); then the other party runs, until it reaches a wait of its
own or ends; then the first completes its wait (by now its all-to-all has
moved while the other computed) and goes on:

    party 0 (forward)   [compute, issue A] ........... [wait A, compute, issue C] ...........
    party 1 (backward)  .................. [compute, issue B] ......................... [wait B, ...]

Because the order of the hand-overs depends only on the code each party
runs, every rank of an expert-parallel group starts its collectives in the
same order, as the process group requires; two parties computing at once
could not promise that. A party that ends hands the turn over for good.
The alternation needs no thread to know which party it is: only the
holder of the turn runs (or a thread working for it, such as an autograd
engine thread), so whoever calls ``hand_over`` acts for the holder.

Outside ``taking_turns`` (the default), ``hand_over()`` does nothing.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional


class Turns:
    """Parties 0 and 1 alternating (module docstring); party 0 holds the turn first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._holder = 0
        self._ended = [False, False]

    def hand_over(self) -> None:
        """The holder lets the other party run until it hands the turn back or ends; no-op once it has ended."""
        with self._cond:
            me, other = self._holder, 1 - self._holder
            if self._ended[other]:
                return
            self._holder = other
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._holder == me)

    def run(self, party: int, work: Callable[[], None]) -> None:
        """``work()`` as ``party``: it starts when the party holds the turn; when it ends (or raises), the other
        party holds the turn for good."""
        with self._cond:
            self._cond.wait_for(lambda: self._holder == party)
        try:
            work()
        finally:
            with self._cond:
                self._ended[party] = True
                self._holder = 1 - party
                self._cond.notify_all()


_ACTIVE: Optional[Turns] = None


def hand_over() -> None:
    """Before waiting for an all-to-all: let the other party run (inside ``taking_turns``), else nothing."""
    if _ACTIVE is not None:
        _ACTIVE.hand_over()


@contextlib.contextmanager
def taking_turns() -> Iterator[Turns]:
    """The ``Turns`` that ``hand_over()`` passes, inside the block."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("taking_turns: already inside a taking_turns block (one overlapped pair at a time)")
    _ACTIVE = Turns()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = None


def run_in_turns(first: Callable[[], None], second: Callable[[], None]) -> None:
    """``first`` (party 0, this thread) and ``second`` (party 1, a new thread) taking turns at their waits;
    returns when both have ended and re-raises the first error either raised."""
    errors: list[BaseException] = []

    def party(index: int, work: Callable[[], None]) -> None:
        try:
            turns.run(index, work)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread below
            errors.append(err)

    with taking_turns() as turns:
        worker = threading.Thread(target=party, args=(1, second), name="moe_ep-overlap-backward", daemon=True)
        worker.start()
        party(0, first)
        worker.join()
    if errors:
        raise errors[0]
