"""The training loop shared by launchers.

One optimizer step ``s`` (0-based) on every rank:

    batch  = sampler.batch(s)                       this rank's [B, S+1] windows
    loss   = CE(model(batch[:, :-1]), batch[:, 1:]) + total_aux_loss(model)
    loss.backward()
    sync_gradients(model, parallel)                 global gradient (moe_ep/parallel/grads.py)
    clip_gradients(model, parallel, grad_clip)      global norm over the unsharded model
    optimizer.step()                                AdamW at lr_at(s)
    update_moe_bias(model)                          V3 bias step from this step's global loads

``model`` is an ``MoETransformerLM`` or a transformers causal LM made
expert-parallel by ``moe_ep.hf_model.expert_parallelize`` (its output's
``.logits`` are used); ``moe_ep.model_moe`` finds the MoE layers of either.

Between steps, at ``step`` = updates done: a record is written when ``step``
is a multiple of ``log_every`` or the last step (metrics.py lists the
fields), validation runs when it is a multiple of ``val_every``, the first
step of the run (step 0 or the resumed step) or the last, and a checkpoint
is saved when it is a multiple of ``ckpt_every`` or the last (not at the
step a run resumed from).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import BatchSampler
from ..model_moe import moe_layers, total_aux_loss, update_moe_bias
from ..parallel.grads import clip_gradients, sync_gradients
from ..parallel.state import ParallelState
from .config import TrainConfig
from .metrics import IntervalMeter, MetricsLog, ProgressBar
from .optim import build_optimizer, lr_at, set_lr


@dataclass
class RunResult:
    """What a finished run reports (identical on every rank): validation loss per step of this run."""

    val_losses: dict[int, float]
    last_checkpoint: Optional[Path]


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


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], parallel: ParallelState) -> float:
    """Mean validation cross-entropy over every rank's batches (collective)."""
    was_training = model.training
    model.eval()
    device = batches[0].device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        total[0] += next_token_loss(model, batch).double() * batch[:, 1:].numel()
        total[1] += batch[:, 1:].numel()
    parallel.all_reduce_world(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
                parallel: ParallelState, cfg: TrainConfig, meter: IntervalMeter) -> None:
    set_lr(optimizer, lr)
    ce = next_token_loss(model, batch)
    aux = total_aux_loss(model)
    stats = [layer.last_stats for layer in moe_layers(model)]
    optimizer.zero_grad(set_to_none=True)
    (ce + aux).backward()
    sync_gradients(model, parallel)
    grad_norm = clip_gradients(model, parallel, cfg.grad_clip)
    optimizer.step()
    update_moe_bias(model)
    meter.add(ce.detach(), aux.detach(), grad_norm, stats, lr)


def train(model: nn.Module, sampler: BatchSampler, parallel: ParallelState, cfg: TrainConfig,
          resume_from: Optional[Path] = None) -> RunResult:
    """Train ``model`` to ``cfg.steps`` updates on every rank; see the module docstring.

    ``resume_from``: a complete checkpoint folder, written at any layout
    (``moe_ep.checkpoint``); the run continues from its step. The model must already be on its device.
    """
    out_dir = Path(cfg.out_dir)
    is_rank0 = not parallel.distributed or dist.get_rank() == 0
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, cfg)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, model, optimizer, sampler, parallel, cfg)
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=is_rank0, start_step=start)
    val_batches = [b.to(device) for b in sampler.val_batches(cfg.val_batches)]
    moe = moe_layers(model)
    meter = IntervalMeter(len(moe), moe[0].config.n_routed_experts if moe else 0,
                          cfg.batch_size * cfg.seq_len * parallel.world_size, device)
    bar = ProgressBar(cfg.steps, start, enabled=is_rank0)
    val_losses: dict[int, float] = {}
    last_checkpoint = None
    model.train()
    for step in range(start, cfg.steps + 1):
        last = step == cfg.steps
        record = {}
        if step > start and (step % cfg.log_every == 0 or last):
            record.update(meter.flush(parallel))
        if step == start or step % cfg.val_every == 0 or last:
            val_losses[step] = record["val_loss"] = evaluate(model, val_batches, parallel)
        if record:
            log.write(dict(step=step, **record))
            bar.show(record)
        if cfg.ckpt_every and step > start and (step % cfg.ckpt_every == 0 or last):
            last_checkpoint = save_checkpoint(out_dir, step, model, optimizer, sampler, parallel, cfg)
        if last:
            break
        meter.begin_step()
        batch = sampler.batch(step).to(device, non_blocking=True)
        _train_step(model, optimizer, batch, lr_at(step, cfg), parallel, cfg, meter)
        bar.advance()
    bar.close()
    return RunResult(val_losses=val_losses, last_checkpoint=last_checkpoint)
