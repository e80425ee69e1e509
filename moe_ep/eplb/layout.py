"""The logical layout of a model's experts: what checkpoints and conversions read and write.

Under a placement (``MoELayer.placement``: replicas, experts moved between ranks) a rank's expert stack
holds its slots, not the rows ``[r E / ep, (r + 1) E / ep)`` that the checkpoint format shards by
(moe_ep/checkpoint/tensors.py). ``logical_layout(model, optimizer)`` moves every placed layer to that
layout for the duration of a block (weights and the optimizer's moments, by all-to-all) and back to its
placement after it, so a checkpoint always stores each logical expert once, in id order: a run with
replicas resumes without them, and the other way round, at any (dp, ep) layout.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..model_moe import moe_layers


@contextlib.contextmanager
def logical_layout(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Iterator[None]:
    """Inside: every MoE layer of ``model`` without a placement; on exit (also on an error) each gets its
    placement back, with whatever weights and moments the block left in the logical layout.

    Collective over the EP groups of placed layers (every rank must enter and leave together); without a
    placed layer it does nothing.
    """
    placed = [(layer, layer.placement) for layer in moe_layers(model) if layer.placement is not None]
    for layer, _ in placed:
        layer.set_placement(None, optimizer)
    try:
        yield
    finally:
        for layer, placement in placed:
            layer.set_placement(placement, optimizer)
