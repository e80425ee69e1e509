"""Explicit dtypes inside the MoE layer: the experts' compute dtype, and autocast switched off.

Under ``torch.autocast`` the layer computes its experts in the autocast dtype
and everything else in the dtypes it chooses (moe_ep/layer.py); inside, it
turns autocast off so no op is recast behind its back. Device types without
autocast (``meta``) have nothing to switch off.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype of x's device when autocast is on there, else x's dtype."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(device_type: str) -> ContextManager:
    """A context in which autocast is off on ``device_type``."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
