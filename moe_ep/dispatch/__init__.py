"""Dispatchers: move (token, expert) pairs to their experts and the results back."""
from .local import LocalDispatcher

__all__ = ["LocalDispatcher"]
