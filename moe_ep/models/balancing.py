"""What the training loop asks of a language model's MoE layers, for any ``nn.Module`` holding ``MoELayer``s.

``MoEBalancing`` is a mixin (``MoETransformerLM`` and the distillation
adapter of a transformers model use it): ``moe_layers()``, ``aux_loss()``,
``update_moe_bias()`` and ``parameter_counts()`` (total and per-token
activated parameters of the global, unsharded model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layer import MoELayer


@dataclass(frozen=True)
class ParameterCounts:
    """total: every parameter of the global model; activated: those one token uses."""

    total: int
    activated: int


class MoEBalancing:
    """Mixin for ``nn.Module`` language models whose FFNs may be ``MoELayer``s (none is fine)."""

    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs, in depth order."""
        return [m for m in self.modules() if isinstance(m, MoELayer)]  # also finds wrapped layers (DeepSpeed)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses of the last forward (global value, see balance.py); 0 without MoE."""
        total = next(self.parameters()).new_zeros((), dtype=torch.float32)
        for layer in self.moe_layers():
            total = total + layer.aux_loss.float()
        return total

    def update_moe_bias(self) -> None:
        """One aux-free bias step per MoE layer; call once per optimizer step."""
        for layer in self.moe_layers():
            layer.update_bias()

    def parameter_counts(self) -> ParameterCounts:
        """Parameter counts of the global model, from any rank's shard.

        A routed expert stack (``MoELayer.experts``) holds ``E / ep_size`` of
        the layer's ``E`` experts on this rank; globally it has ``ep_size``
        times its local size, of which a token activates ``K / E`` (its top-K
        experts). Every other parameter (shared experts, routers, attention,
        dense FFNs, embeddings) is counted once and is always active, as are
        expert modules other than ``MoELayer`` (e.g. a transformers MoE block).
        """
        total = activated = sum(p.numel() for p in self.parameters())
        for layer in self.moe_layers():
            shard = sum(p.numel() for p in layer.experts.parameters())
            routed = shard * layer.parallel.ep_size
            total += routed - shard
            activated += routed * layer.config.num_experts_per_tok // layer.config.n_routed_experts - shard
        return ParameterCounts(total=total, activated=activated)
