"""AdamW with decoupled weight decay on matrices, and the warmup + cosine learning rate."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The parameter groups ``decay`` (tensors of 2+ dims, at ``weight_decay``) and ``no_decay`` (1-D, at 0).

    Norm weights (1-D) are not decayed; the embedding, projections, routers
    and expert stacks are. Group order is fixed, so optimizer state dicts of
    identical models match.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(name="decay", params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
            dict(name="no_decay", params=[p for p in params if p.dim() < 2], weight_decay=0.0)]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every trainable parameter in ``decay_groups``."""
    return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the update made at ``step`` (0-based).

    ``lr * (step + 1) / warmup_steps`` during warmup, then cosine from ``lr``
    to ``lr * min_lr_ratio`` reached at ``steps - 1``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
