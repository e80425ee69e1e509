"""A whole model's MoE layers: collect them, sum their auxiliary losses, step their V3 bias.

These work on any ``nn.Module`` that holds ``MoELayer``s: ``MoETransformerLM``,
a transformers DeepSeek model after ``moe_ep.hf_model.expert_parallelize``,
and either one after ``integrations.deepspeed.wrap_moe_layers`` (the wrapper
holds the layer, so it is found too). The training loops use them:

    loss = task_loss + total_aux_loss(model)       after the forward
    ...optimizer step...
    update_moe_bias(model)                         once per optimizer step
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import MoELayer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every ``MoELayer`` of ``model`` in module order (depth order for a decoder), wrapped or not."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' auxiliary losses of the last forward (fp32; global value, see balance.py)."""
    total = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for layer in moe_layers(model):
        total = total + layer.aux_loss.float()
    return total


def update_moe_bias(model: nn.Module) -> None:
    """One aux-free bias step per MoE layer (V3; a no-op reset for the others); once per optimizer step."""
    for layer in moe_layers(model):
        layer.update_bias()
