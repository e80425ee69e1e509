"""``PlainTrainer``: the optimizer step of launch/train.py, with moe_ep's resharding checkpoints.

One step ``s`` on every rank:

    micro-batches of the batch (step.py): loss_m = CE [+ L_MTP] + total_aux_loss, (loss_m / N).backward()
    sync_gradients(model, parallel)                 global gradient (moe_ep/gradients.py)
    clip_gradients(model, parallel, grad_clip)      global norm over the unsharded model
    optimizer.step()                                AdamW at lr_at(s)
    balancer.after_step(optimizer)                  with eplb_interval N: every N steps, re-place the experts
                                                    (moe_ep/eplb/balancer.py; weights and moments move)
    update_moe_bias(model)                          V3 bias step from this step's global loads

``model`` is an ``MoETransformerLM`` or a transformers causal LM made
expert-parallel by ``moe_ep.hf_model.expert_parallelize`` (its output's
``.logits`` are used); ``moe_ep.model_moe`` finds the MoE layers of either.
With ``cfg.activation_checkpointing`` its blocks are checkpointed
(``moe_ep.activation_checkpointing``). Checkpoints: ``moe_ep.checkpoint``'s
format, written at one (dp, ep) layout and read at any.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..activation_checkpointing import enable_activation_checkpointing
from ..data import BatchSampler
from ..eplb.balancer import Rebalancer
from ..gradients import clip_gradients, sync_gradients
from ..model_moe import update_moe_bias
from ..parallel.state import ParallelState
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .driver import Trainer
from .mtp import DEFAULT_MTP_WEIGHT
from .optim import build_optimizer, lr_at, set_lr
from .step import StepResult, forward_backward, language_model_loss, split_micro_batches


class PlainTrainer(Trainer):
    """AdamW over ``model`` (already on its device) with the global gradient and norm of ``parallel``.

    ``eplb_interval``: re-plan the experts' placement every that many steps (``--eplb-interval``); 0: never.
    ``mtp_weight``: lambda of the MTP loss of a model with MTP modules (``--mtp-weight``; training/mtp.py).
    """

    def __init__(self, model: nn.Module, parallel: ParallelState, cfg: TrainConfig, eplb_interval: int = 0,
                 mtp_weight: float = DEFAULT_MTP_WEIGHT):
        self.model, self.parallel, self.cfg = model, parallel, cfg
        self.mtp_weight = mtp_weight
        self.precision = cfg.precision
        self.optimizer = build_optimizer(model, cfg)
        self.balancer = Rebalancer(model, eplb_interval) if eplb_interval else None
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)

    def train_step(self, batch_BS: torch.Tensor, step: int) -> StepResult:
        return self.update(batch_BS, lr_at(step, self.cfg))

    def update(self, batch_BS: torch.Tensor, lr: float) -> StepResult:
        """The optimizer step of ``train_step`` at learning rate ``lr`` (module docstring)."""
        cfg, model = self.cfg, self.model
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = split_micro_batches(batch_BS, cfg.grad_accum)
        n = len(micro_batches)
        result = forward_backward(model, micro_batches, language_model_loss(model, model, self.mtp_weight),
                                  lambda loss, last: (loss / n).backward(), cfg.precision)
        sync_gradients(model, self.parallel)
        result.grad_norm = clip_gradients(model, self.parallel, cfg.grad_clip)
        self.optimizer.step()
        if self.balancer is not None:
            result.eplb = self.balancer.after_step(self.optimizer)
        update_moe_bias(model)
        result.lr = lr
        return result

    def save(self, out_dir: Path, step: int, sampler: BatchSampler) -> Path:
        return save_checkpoint(out_dir, step, self.model, self.optimizer, sampler, self.parallel, self.cfg)

    def load(self, folder: Path, sampler: BatchSampler) -> int:
        step = load_checkpoint(folder, self.model, self.optimizer, sampler, self.parallel, self.cfg)
        if self.balancer is not None:
            self.balancer.steps = step
        return step
