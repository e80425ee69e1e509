"""One optimizer step: micro-batches, precision, losses; shared by the plain loop and the DeepSpeed step.

A rank's batch of a step (``B`` sequences) is split into ``N`` micro-batches
of ``B / N`` sequences (gradient accumulation; N = 1: the batch itself). For
each micro-batch ``m``, under the precision's autocast:

    loss_m = CE(model(m[:, :-1]), m[:, 1:]) + total_aux_loss(model)
    backward(loss_m / N)          the plain loop; DeepSpeed's engine.backward divides by N itself

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
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ..model_moe import moe_layers, total_aux_loss, update_moe_bias
from ..parallel.grads import clip_gradients, sync_gradients
from ..parallel.state import ParallelState
from .config import PRECISIONS, TrainConfig
from .optim import set_lr


@dataclass
class StepResult:
    """What one optimizer step reports (detached tensors).

    ce, aux: mean cross-entropy and summed MoE auxiliary loss over the
        step's micro-batches; grad_norm: global norm before clipping;
    stats: each micro-batch's list of MoE ``last_stats`` (depth order);
    applied: False when the optimizer skipped the step (fp16 overflow).
    """

    ce: torch.Tensor
    aux: torch.Tensor
    grad_norm: torch.Tensor
    stats: list[list]
    applied: bool = True


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


def forward_backward(forward: nn.Module, model: nn.Module, micro_batches: list[torch.Tensor],
                     backward: Callable[[torch.Tensor, bool], None], precision: str = "fp32") -> StepResult:
    """Forward and backward of every micro-batch (module docstring); the step's result, ``grad_norm`` unset (NaN).

    ``forward``: what runs the batch (the model, or the DeepSpeed engine
    around it); ``model``: where the MoE layers are. ``backward(loss_m,
    is_last)`` back-propagates ``loss_m`` (scaling it by 1/N is its job).
    """
    device = micro_batches[0].device
    ce_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    stats = []
    for i, micro in enumerate(micro_batches):
        with precision_autocast(precision, device):
            ce = next_token_loss(forward, micro)
        aux = total_aux_loss(model)
        stats.append([layer.last_stats for layer in moe_layers(model)])
        backward(ce + aux, i == len(micro_batches) - 1)
        ce_sum += ce.detach()
        aux_sum += aux.detach()
    n = len(micro_batches)
    return StepResult(ce_sum / n, aux_sum / n, torch.full((), float("nan")), stats)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
               parallel: ParallelState, cfg: TrainConfig) -> StepResult:
    """One optimizer step of the plain loop over ``cfg.grad_accum`` micro-batches of ``batch``.

    Micro-batches (module docstring), then ``sync_gradients``,
    ``clip_gradients``, AdamW, ``update_moe_bias``.
    """
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    micro_batches = split_micro_batches(batch, cfg.grad_accum)
    n = len(micro_batches)
    result = forward_backward(model, model, micro_batches, lambda loss, last: (loss / n).backward(),
                              cfg.precision)
    sync_gradients(model, parallel)
    result.grad_norm = clip_gradients(model, parallel, cfg.grad_clip)
    optimizer.step()
    update_moe_bias(model)
    return result
