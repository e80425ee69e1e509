"""The training loop shared by launchers.

One optimizer step ``s`` (0-based) on every rank (``step.train_step``):

    batch  = sampler.batch(s)                       this rank's [B, S+1] windows
    for each of the grad_accum micro-batches m of batch (autocast under bf16):
        loss_m = CE(model(m[:, :-1]), m[:, 1:]) + total_aux_loss(model)
        (loss_m / grad_accum).backward()
    sync_gradients(model, parallel)                 global gradient (moe_ep/parallel/grads.py)
    clip_gradients(model, parallel, grad_clip)      global norm over the unsharded model
    optimizer.step()                                AdamW at lr_at(s)
    update_moe_bias(model)                          V3 bias step from this step's global loads

``model`` is an ``MoETransformerLM`` or a transformers causal LM made
expert-parallel by ``moe_ep.hf_model.expert_parallelize`` (its output's
``.logits`` are used); ``moe_ep.model_moe`` finds the MoE layers of either.
With ``activation_checkpointing`` its blocks are checkpointed
(``moe_ep.activation_checkpointing``); validation runs under the training
precision's autocast.

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
from torch import nn

from ..activation_checkpointing import enable_activation_checkpointing
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import BatchSampler
from ..model_moe import moe_layers
from ..parallel.state import ParallelState
from .config import TrainConfig
from .metrics import IntervalMeter, MetricsLog, ProgressBar
from .optim import build_optimizer, lr_at
# cross_entropy now lives in step.py; it stays importable from here, as before
from .step import cross_entropy, next_token_loss, precision_autocast, train_step  # noqa: F401


@dataclass
class RunResult:
    """What a finished run reports (identical on every rank): validation loss per step of this run."""

    val_losses: dict[int, float]
    last_checkpoint: Optional[Path]


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], parallel: ParallelState,
             precision: str = "fp32") -> float:
    """Mean validation cross-entropy over every rank's batches (collective), under ``precision``'s autocast."""
    was_training = model.training
    model.eval()
    device = batches[0].device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        with precision_autocast(precision, device):
            ce = next_token_loss(model, batch)
        total[0] += ce.double() * batch[:, 1:].numel()
        total[1] += batch[:, 1:].numel()
    parallel.all_reduce_world(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


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
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
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
            val_losses[step] = record["val_loss"] = evaluate(model, val_batches, parallel, cfg.precision)
        if record:
            log.write(dict(step=step, **record))
            bar.show(record)
        if cfg.ckpt_every and step > start and (step % cfg.ckpt_every == 0 or last):
            last_checkpoint = save_checkpoint(out_dir, step, model, optimizer, sampler, parallel, cfg)
        if last:
            break
        meter.begin_step()
        batch = sampler.batch(step).to(device, non_blocking=True)
        lr = lr_at(step, cfg)
        meter.add(train_step(model, optimizer, batch, lr, parallel, cfg), lr)
        bar.advance()
    bar.close()
    return RunResult(val_losses=val_losses, last_checkpoint=last_checkpoint)
