"""The multi-token prediction loss (DeepSeek-V3 report, eq. 24-25) and its metrics.

With ``D`` MTP modules (``ModelConfig.mtp_depth``; ``moe_ep.models.mtp``), depth ``k``'s logits
``[B, S-k, V]`` predict ``labels[:, k:]`` (``labels = t_1 .. t_S``, the model's own next-token targets):

    CE_k  = mean over its B * (S - k) positions of -log softmax(logits^k)[target]     (fp32)
    L_MTP = lambda / D * sum_k CE_k                                                    (lambda: --mtp-weight)
    loss  = CE + L_MTP (+ every MoE layer's auxiliary loss, the MTP blocks' included)

The step's parts (``StepResult.parts``, then ``<name>_loss`` in metrics.jsonl): ``mtp`` = L_MTP and
``mtp_<k>`` = CE_k. Validation reports the model's own CE only.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import ModelConfig

DEFAULT_MTP_WEIGHT = 0.3  # lambda of DeepSeek-V3's first 10T tokens (0.1 after)


def mtp_depth(model: nn.Module) -> int:
    """``D`` of an ``MoETransformerLM`` or a pipeline part of one (its ``config``); 0 for any other model."""
    config = getattr(model, "config", None)
    return config.mtp_depth if isinstance(config, ModelConfig) else 0


def mtp_loss(mtp_logits: Sequence[torch.Tensor], labels_BS: torch.Tensor,
             weight: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(L_MTP, [CE_1 .. CE_D])`` of each depth's logits against ``labels`` (module docstring)."""
    if not mtp_logits:
        raise ValueError("mtp_loss: no MTP logits (mtp_depth 0)")
    ces = [F.cross_entropy(logits.flatten(0, 1).float(), labels_BS[:, k:].flatten())
           for k, logits in enumerate(mtp_logits, start=1)]
    return weight / len(ces) * torch.stack(ces).sum(), ces


def add_mtp(ce: torch.Tensor, mtp_logits: Sequence[torch.Tensor], labels_BS: torch.Tensor,
            weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(ce + L_MTP, parts)``: the training loss without the aux losses, and ``mtp``, ``mtp_1`` .. ``mtp_D``
    (detached)."""
    total, ces = mtp_loss(mtp_logits, labels_BS, weight)
    parts = dict(mtp=total.detach(), **{f"mtp_{k}": ce_k.detach() for k, ce_k in enumerate(ces, start=1)})
    return ce + total, parts
