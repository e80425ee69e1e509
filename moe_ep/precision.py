"""Dtypes by name, and explicit dtypes inside the MoE layer: the experts' compute dtype, autocast switched off.

``DTYPES`` is the one map from the names configs and flags use to torch dtypes.

Under ``torch.autocast`` the layer computes its experts in the autocast dtype
and everything else in the dtypes it chooses (moe_ep/layer.py); inside, it
turns autocast off so no op is recast behind its back. Device types without
autocast (``meta``) have nothing to switch off.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Sequence, Union

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: Union[str, torch.dtype], what: str, choices: Sequence[str] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype ``dtype`` names (or is), when one of ``choices``; else ``ValueError`` naming ``what``."""
    allowed = {DTYPES[name] for name in choices}
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in allowed:
        raise ValueError(f"{what}: unknown or unsupported dtype {dtype!r}; choose from {list(choices)}")
    return resolved


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
