"""The training driver: one loop around every way of taking an optimizer step.

    result = run(trainer, sampler, parallel, cfg, resume=None, tensorboard=False)

A ``Trainer`` takes one optimizer step of its own kind (plain AdamW
``training.plain.PlainTrainer``, a DeepSpeed engine
``training.deepspeed.DeepSpeedTrainer``, distillation
``distill.Distiller``); the driver owns everything around the steps, on
every rank, at ``step`` = updates done (``start`` ... ``cfg.steps``):

    record       step > start and (step % log_every == 0 or last): the interval's metrics (metrics.py),
                 written to metrics.jsonl and, with ``tensorboard``, to TensorBoard (rank 0)
    validation   step == start, step % val_every == 0, or last: ``trainer.evaluate``, the mean cross-entropy
                 over every rank's validation batches, under the trainer's precision; at ``start`` also
                 ``trainer.first_validation`` (the distillation teacher's loss)
    checkpoint   ckpt_every > 0, step > start and (step % ckpt_every == 0 or last): ``trainer.save``
    step         ``trainer.train_step(sampler.batch(step), step)`` (collective)

``start`` is ``trainer.load(resume, sampler)`` when resuming, else
``trainer.start_step`` (0, or the step a DeepSpeed run was initialised from).
At the end rank 0 draws the plots of ``training.plots`` next to
``metrics.jsonl`` in ``cfg.out_dir``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..data import BatchSampler
from ..model_moe import moe_layers
from ..parallel.state import ParallelState
from .config import TrainConfig
from .metrics import IntervalMeter, MetricsLog, ProgressBar
from .step import StepResult, next_token_loss, precision_autocast
from .tensorboard import TensorBoardLog


class Trainer(abc.ABC):
    """One kind of optimizer step, with its checkpoints.

    ``model``: what the driver validates and whose MoE layers it meters;
    ``precision``: the autocast of validation (``fp32`` / ``bf16``);
    ``start_step``: where a run without ``resume`` starts.
    """

    model: nn.Module
    precision: str = "fp32"
    start_step: int = 0

    @abc.abstractmethod
    def train_step(self, batch_BS: torch.Tensor, step: int) -> StepResult:
        """One optimizer step on this rank's batch of ``step`` (collective): micro-batches, update, MoE bias."""

    @abc.abstractmethod
    def save(self, out_dir: Path, step: int, sampler: BatchSampler) -> Optional[Path]:
        """Write a checkpoint after ``step`` updates (collective); where it went."""

    def load(self, folder: Path, sampler: BatchSampler) -> int:
        """Restore a checkpoint (collective); the step to continue from."""
        raise ValueError(f"{type(self).__name__} cannot resume from a checkpoint")

    def first_validation(self, val_batches: list[torch.Tensor], parallel: ParallelState) -> dict:
        """Extra fields of the run's first validation record (collective)."""
        return {}

    def evaluate(self, val_batches: list[torch.Tensor], parallel: ParallelState) -> float:
        """Mean validation cross-entropy of ``model`` over every rank's batches (collective; ``evaluate``)."""
        return evaluate(self.model, val_batches, parallel, self.precision)

    def moe_shape(self) -> tuple[int, int]:
        """(MoE layers, routed experts per layer) of the whole model, for the metrics."""
        layers = moe_layers(self.model)
        return len(layers), layers[0].config.n_routed_experts if layers else 0


@dataclass
class RunResult:
    """What a finished run reports (identical on every rank).

    val_losses: validation loss per validation step of this run; first_record:
    the ``first_validation`` fields; last_checkpoint: the last ``save``'s path.
    """

    val_losses: dict[int, float]
    first_record: dict = field(default_factory=dict)
    last_checkpoint: Optional[Path] = None


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


def run(trainer: Trainer, sampler: BatchSampler, parallel: ParallelState, cfg: TrainConfig,
        resume: Optional[Path] = None, tensorboard: bool = False) -> RunResult:
    """Train to ``cfg.steps`` updates on every rank (module docstring); ``resume``: a checkpoint folder."""
    out_dir = Path(cfg.out_dir)
    is_rank0 = parallel.is_rank0
    device = next(trainer.model.parameters()).device
    start = trainer.load(resume, sampler) if resume is not None else trainer.start_step
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=is_rank0, start_step=start)
    board = TensorBoardLog(out_dir / "tensorboard", enabled=is_rank0 and tensorboard, start_step=start)
    val_batches = [b.to(device) for b in sampler.val_batches(cfg.val_batches)]
    meter = IntervalMeter(*trainer.moe_shape(), cfg.batch_size * cfg.seq_len * parallel.world_size, device)
    bar = ProgressBar(cfg.steps, start, enabled=is_rank0)
    result = RunResult(val_losses={})
    trainer.model.train()
    for step in range(start, cfg.steps + 1):
        last = step == cfg.steps
        record = {}
        if step > start and (step % cfg.log_every == 0 or last):
            record.update(meter.flush(parallel))
        if step == start:
            result.first_record = trainer.first_validation(val_batches, parallel)
            record.update(result.first_record)
        if step == start or step % cfg.val_every == 0 or last:
            result.val_losses[step] = record["val_loss"] = trainer.evaluate(val_batches, parallel)
        if record:
            log.write(dict(step=step, **record))
            board.write(dict(step=step, **record))
            bar.show(record)
        if cfg.ckpt_every and step > start and (step % cfg.ckpt_every == 0 or last):
            result.last_checkpoint = trainer.save(out_dir, step, sampler)
        if last:
            break
        meter.begin_step()
        meter.add(trainer.train_step(sampler.batch(step).to(device, non_blocking=True), step))
        bar.advance()
    bar.close()
    board.close()
    if is_rank0:
        from .plots import plot_run  # matplotlib (0.6 s to import) only where the plots are drawn

        plot_run(out_dir)
    return result
