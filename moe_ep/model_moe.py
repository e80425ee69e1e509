"""A whole model's MoE layers: collect them, sum their auxiliary losses, step their V3 bias, count parameters.

These work on any ``nn.Module`` that holds ``MoELayer``s: ``MoETransformerLM``,
a transformers DeepSeek model after ``moe_ep.hf_model.expert_parallelize``,
and either one after ``integrations.deepspeed.wrap_moe_layers`` (the wrapper
holds the layer, so it is found too). The training loops use them:

    loss = task_loss + total_aux_loss(model)       after the forward (of each micro-batch)
    ...optimizer step...
    update_moe_bias(model)                         once per applied optimizer step
    discard_moe_pending(model)                     instead, for a step the optimizer skipped (fp16 overflow)

These functions are the one route to a model's MoE layers: the layer's own
``aux_loss`` / ``update_bias()`` below, a model's through them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layer import MoELayer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every ``MoELayer`` of ``model`` in module order (depth order for a decoder), wrapped or not."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def child_slots(model: nn.Module, match: Callable[[nn.Module], bool]) -> list[tuple[nn.Module, str]]:
    """``(parent, attribute)`` of every submodule of ``model`` that ``match`` accepts, in module order.

    The one way to find modules to replace in place (``setattr(parent, attribute, new)``): the
    DeepSpeed wrapper, ``hf_model.expert_parallelize``. No reference to the matched modules is kept.
    """
    return [(parent, name) for parent in model.modules() for name, child in parent.named_children() if match(child)]


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' auxiliary losses of the last forward (fp32; global value, see balance.py)."""
    total = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for layer in moe_layers(model):
        total = total + layer.aux_loss.float()
    return total


def update_moe_bias(model: nn.Module) -> None:
    """Close an applied optimizer step in every MoE layer: V3 bias step (if enabled), drop step advanced."""
    for layer in moe_layers(model):
        layer.update_bias()


def discard_moe_pending(model: nn.Module) -> None:
    """Close a skipped optimizer step in every MoE layer: its loads and drop-step advance are forgotten."""
    for layer in moe_layers(model):
        layer.discard_pending()


@dataclass(frozen=True)
class ParameterCounts:
    """total: every parameter of the global model; activated: those one token uses."""

    total: int
    activated: int


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Parameter counts of the global (unsharded) model, from any rank's shard.

    A routed expert stack (``MoELayer.experts``) holds this rank's slots of the
    layer's ``E`` experts (``E / ep_size`` of them, or its placement's slots,
    replicas included); globally it has ``E`` experts, of which a token
    activates ``K / E`` (its top-K experts).
    Every other parameter (shared experts, routers, attention, dense FFNs,
    embeddings) is counted once and is always active, as are expert modules
    other than ``MoELayer`` (e.g. a transformers MoE block).
    """
    total = activated = sum(p.numel() for p in model.parameters())
    for layer in moe_layers(model):
        shard = sum(p.numel() for p in layer.experts.parameters())
        routed = shard // layer.experts.num_local_experts * layer.config.n_routed_experts
        total += routed - shard
        activated += routed * layer.config.num_experts_per_tok // layer.config.n_routed_experts - shard
    return ParameterCounts(total=total, activated=activated)
