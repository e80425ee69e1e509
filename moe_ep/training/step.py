"""What every trainer's step shares: micro-batches, precision, losses, and the step's result.

A rank's batch of a step (``B`` sequences) is split into ``N`` micro-batches
of ``B / N`` sequences (gradient accumulation; N = 1: the batch itself). For
each micro-batch ``m``, under the precision's autocast:

    loss_m, parts_m = loss_fn(m)        e.g. CE(model(m[:, :-1]), m[:, 1:]) + total_aux_loss(model)
    backward(loss_m, last)              scaling by 1/N is the trainer's (DeepSpeed's engine does it itself)

so the auxiliary losses are scaled like the main loss, and the MoE layers
accumulate every micro-batch's loads until the step is closed
(``update_moe_bias`` once per applied step, ``discard_moe_pending`` for a
skipped one). With equal micro-batches the summed gradient is the gradient
of the mean loss over the step's micro-batches; with sequence-scope balance
losses and no dropping that is the gradient of the whole batch in one
forward (batch-scope losses and capacities are per forward: they see one
micro-batch).

Precision (``TrainConfig.precision``): ``fp32``, or ``bf16``: the forward
and the loss run under ``torch.autocast(dtype=bfloat16)`` while the weights,
gradients and AdamW state stay fp32 (``moe_ep.layer`` describes what the MoE
layers compute in which dtype). The plain loop has no loss scaling, so no
fp16; DeepSpeed's ``fp16`` section has (launch/ds_config_fp16.json).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model_moe import moe_layers, total_aux_loss
from .config import PRECISIONS
from .mtp import DEFAULT_MTP_WEIGHT, add_mtp, mtp_depth

LossFn = Callable[[Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class StepResult:
    """What one optimizer step reports (detached tensors).

    ce, aux: mean cross-entropy on the labels and summed MoE auxiliary loss
        over the step's micro-batches; parts: the means of any other named
        loss parts (distillation's ``distill``, ``hidden``, ``total``...);
    grad_norm: global norm before clipping (NaN when not measured);
    stats: each micro-batch's list of MoE ``last_stats`` (depth order);
    lr: the learning rate of the update; applied: False when the optimizer
        skipped the step (fp16 overflow); eplb: what an expert re-placement
        after the step measured (``moe_ep.eplb.balancer``), None without one.
    """

    ce: torch.Tensor
    aux: torch.Tensor
    grad_norm: torch.Tensor
    stats: list[list]
    lr: float = math.nan
    applied: bool = True
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    eplb: Optional[dict] = None


def cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())


def next_token_loss(model: nn.Module, batch_BS: torch.Tensor) -> torch.Tensor:
    """``cross_entropy`` of ``model(batch[:, :-1])`` against ``batch[:, 1:]``.

    The model returns logits ``[B, S-1, V]`` (``MoETransformerLM``) or a
    transformers output whose ``.logits`` they are.
    """
    out = model(batch_BS[:, :-1])
    return cross_entropy(out if torch.is_tensor(out) else out.logits, batch_BS[:, 1:])


def language_model_loss(forward: nn.Module, model: nn.Module, mtp_weight: float = DEFAULT_MTP_WEIGHT) -> LossFn:
    """``loss_fn`` of next-token training: ``CE(forward(m[:, :-1]), m[:, 1:]) + total_aux_loss(model)``.

    ``forward``: what runs the batch (the model, or a DeepSpeed engine around
    it); ``model``: where the MoE layers are. A model with MTP modules
    (``mtp_depth`` > 0) adds ``mtp_weight / D * sum_k CE_k`` and reports its
    parts (``moe_ep.training.mtp``).
    """
    def loss_fn(micro_BS: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if mtp_depth(model):
            labels_BS = micro_BS[:, 1:]
            out = forward(micro_BS[:, :-1], mtp_labels=labels_BS)
            ce = cross_entropy(out.logits, labels_BS)
            loss, parts = add_mtp(ce, out.mtp_logits, labels_BS, mtp_weight)
        else:
            ce = next_token_loss(forward, micro_BS)
            loss, parts = ce, {}
        aux = total_aux_loss(model)
        return loss + aux, dict(ce=ce.detach(), aux=aux.detach(), **parts)
    return loss_fn


def precision_autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context of ``precision`` on ``device`` (``fp32``: none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def split_micro_batches(batch_BS: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` consecutive micro-batches of equal size (raises if ``n`` does not divide the batch)."""
    if n < 1 or batch_BS.shape[0] % n:
        raise ValueError(f"gradient accumulation: {n} micro-batches do not divide a batch of "
                         f"{batch_BS.shape[0]} sequences")
    return list(batch_BS.chunk(n))


def forward_backward(model: nn.Module, micro_batches: Sequence[Any], loss_fn: LossFn,
                     backward: Callable[[torch.Tensor, bool], None], precision: str = "fp32",
                     device: Optional[torch.device] = None) -> StepResult:
    """Forward and backward of every micro-batch (module docstring); the step's result without norm and lr.

    ``loss_fn(m) -> (loss, parts)`` runs under the precision's autocast on
    ``device`` (default: the model's); ``parts`` holds at least ``ce`` and
    ``aux`` (detached). ``model``: where the MoE layers are.
    ``backward(loss_m, is_last)`` back-propagates.
    """
    device = device or next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    stats = []
    for i, micro in enumerate(micro_batches):
        with precision_autocast(precision, device):
            loss, parts = loss_fn(micro)
        stats.append([layer.last_stats for layer in moe_layers(model)])
        backward(loss, i == len(micro_batches) - 1)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.float()
    means = {name: total / len(micro_batches) for name, total in sums.items()}
    ce, aux = means.pop("ce"), means.pop("aux")
    return StepResult(ce, aux, torch.full((), float("nan")), stats, parts=means)
