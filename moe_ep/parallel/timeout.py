"""Finite collective timeouts: a rank that stops taking part makes the others fail instead of wait forever.

A collective that does not complete within the timeout of its group raises
on the ranks waiting in it (gloo: ``RuntimeError: ... Timed out waiting
<ms>ms for recv operation to complete``; a peer process that exited gives
``Connection closed by peer`` at once) or, with NCCL, makes the watchdog
abort the process. torch's defaults are 30 minutes (gloo) and 10 minutes
(NCCL), and the groups a ``DeviceMesh`` or DeepSpeed creates take torch's
default rather than the default group's, so the timeout is set on every
group explicitly.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional, Union

import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

DEFAULT_TIMEOUT = timedelta(minutes=5)
Timeout = Union[timedelta, float]


def as_timedelta(timeout: Timeout) -> timedelta:
    """``timeout`` as a ``timedelta`` (a number is seconds); it must be positive."""
    value = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if value <= timedelta(0):
        raise ValueError(f"collective timeout must be positive, got {timeout!r}")
    return value


def set_collective_timeout(timeout: timedelta, *groups: Optional[dist.ProcessGroup]) -> None:
    """Give each distinct group (None: the default group) ``timeout`` for its later collectives."""
    seen = set()
    for group in groups:
        group = group or dist.group.WORLD
        if id(group) not in seen:
            seen.add(id(group))
            _set_pg_timeout(timeout, group)
