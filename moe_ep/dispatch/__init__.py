"""Dispatch: move (token, expert) pairs to their experts and the results back (``Dispatcher``, a list of hops)."""
from .dispatcher import Dispatcher, HopLevel, make_dispatcher
from .rows import DispatchResult

__all__ = ["DispatchResult", "Dispatcher", "HopLevel", "make_dispatcher"]
