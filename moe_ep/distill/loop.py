"""The distillation loop of launch/distill.py, on the training loop's metrics, plots and schedule.

Step ``s`` (0-based) on every rank: ``distiller.train_step(w[:, :-1], labels=w[:, 1:])``
with ``w = sampler.batch(s)``, the batches ``launch/train.py`` draws for the
same seed, batch size, sequence length and world size. At ``step`` =
updates done: a record every ``log_every`` steps and at the last, the
student's validation at step 0, every ``val_every`` steps and at the last
(the step-0 record also holds the teacher's), the student saved every
``ckpt_every`` steps and at the last (when ``ckpt_every`` > 0).

A record has the fields of ``moe_ep/training/metrics.py`` for the student
(``loss`` is its cross-entropy on the labels, ``aux_loss`` its MoE
auxiliary loss) plus the interval means of the other parts of the loss:
``distill_loss``, ``hidden_loss`` / ``attention_loss`` / ``relation_loss``
(when weighted) and ``total_loss``; step 0 adds ``teacher_val_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from matplotlib.figure import Figure

from ..data import BatchSampler
from ..parallel.state import ParallelState
from ..training.loop import evaluate
from ..training.metrics import IntervalMeter, MetricsLog, ProgressBar, read_metrics
from ..training.plots import plot_run, save_figure
from ..training.step import StepResult
from .distiller import Distiller

_METER_PARTS = ("ce", "aux")  # recorded by IntervalMeter as loss and aux_loss


@dataclass
class DistillResult:
    """Identical on every rank: the student's validation loss per step, the teacher's, the last save."""

    val_losses: dict[int, float]
    teacher_val_loss: float
    saved: Optional[Path]


class LossPartsMeter:
    """Per-step loss parts summed on the device between records; ``flush`` gives their mean over steps and ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: Optional[list[str]] = None
        self.sums = torch.zeros(0, dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        if self.names is None:
            self.names = [name for name in parts if name not in _METER_PARTS]
            self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self.sums += torch.stack([parts[name].double() for name in self.names])
        self.steps += 1

    def flush(self, parallel: ParallelState) -> dict:
        """``{name}_loss`` fields (collective: every rank calls it); then reset."""
        means = parallel.all_reduce_world(self.sums.clone()) / (parallel.world_size * max(self.steps, 1))
        self.sums.zero_()
        self.steps = 0
        return {f"{name}_loss": value for name, value in zip(self.names or [], means.tolist())}


def plot_loss_parts(records: list[dict], path: Path) -> Path:
    """``loss_parts.png``: every ``*_loss`` field of the records (and the label loss), log scale."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    names = ["loss"] + sorted({k for r in records for k in r if k.endswith("_loss") and "val" not in k
                               and k != "aux_loss"})
    for name in names:
        points = [(r["step"], r[name]) for r in records if name in r]
        if points:
            ax.plot(*zip(*points), label="loss (labels)" if name == "loss" else name)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (interval mean)")
    ax.set_title("Distillation loss parts")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def distill(distiller: Distiller, sampler: BatchSampler, out_dir: Path) -> DistillResult:
    """Run ``distiller.cfg.steps`` steps on every rank (module docstring); write metrics and plots on rank 0."""
    cfg, parallel, student = distiller.cfg, distiller.parallel, distiller.student
    is_rank0 = not parallel.distributed or dist.get_rank() == 0
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=is_rank0)
    val_batches = [b.to(distiller.device) for b in sampler.val_batches(cfg.val_batches)]
    moe = student.moe_layers()
    meter = IntervalMeter(len(moe), moe[0].config.n_routed_experts if moe else 0,
                          cfg.batch_size * cfg.seq_len * parallel.world_size, distiller.device)
    parts_meter = LossPartsMeter(distiller.device)
    bar = ProgressBar(cfg.steps, 0, enabled=is_rank0)
    teacher_val_loss = evaluate(distiller.teacher, val_batches, parallel)
    val_losses: dict[int, float] = {}
    saved = None
    for step in range(cfg.steps + 1):
        last = step == cfg.steps
        record = dict(teacher_val_loss=teacher_val_loss) if step == 0 else {}
        if step > 0 and (step % cfg.log_every == 0 or last):
            record.update(meter.flush(parallel))
            record.update(parts_meter.flush(parallel))
        if step == 0 or step % cfg.val_every == 0 or last:
            val_losses[step] = record["val_loss"] = evaluate(student, val_batches, parallel)
        if record:
            log.write(dict(step=step, **record))
            bar.show(record)
        if cfg.ckpt_every and step > 0 and (step % cfg.ckpt_every == 0 or last):
            saved = distiller.save_student(out_dir, sampler)
        if last:
            break
        meter.begin_step()
        batch = sampler.batch(step).to(distiller.device, non_blocking=True)
        _, parts = distiller.train_step(batch[:, :-1], labels=batch[:, 1:])
        stats = [[layer.last_stats for layer in moe]]
        meter.add(StepResult(parts["ce"], parts["aux"], distiller.last_grad_norm, stats), distiller.last_lr)
        parts_meter.add(parts)
        bar.advance()
    bar.close()
    if is_rank0:
        plot_run(out_dir)
        plot_loss_parts(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss_parts.png")
    return DistillResult(val_losses=val_losses, teacher_val_loss=teacher_val_loss, saved=saved)
