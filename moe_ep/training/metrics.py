"""Training metrics: per-interval accumulation, ``metrics.jsonl`` and the progress bar.

A record (one JSON object per line) describes the state after ``step``
optimizer updates:

    step          updates done
    loss          mean training cross-entropy (nats/token) of the interval's
                  batches, over every rank
    aux_loss      mean of the summed MoE auxiliary losses (global values)
    tokens_per_s  training tokens of the whole world per second of training
                  time (validation and checkpoint time excluded)
    dropped_frac  dropped (token, expert) pairs / routed pairs, all MoE layers
    routed_pairs, processed_pairs, dropped_pairs
                  (token, expert) pairs of the interval's steps, summed over
                  the MoE layers and every rank: routed by the routers, computed
                  by the experts (counted where they ran), removed by the
                  capacities; ``flush`` raises unless processed + dropped = routed
    max_vio       MaxVio: per step the worst MoE layer's
                  (max expert load - mean load) / mean load, loads over the
                  step's micro-batches, averaged over the interval
    grad_norm     mean global gradient norm before clipping (applied steps)
    skipped_steps optimizer steps of the interval skipped for fp16 overflow
                  (DeepSpeed's loss scaler; 0 otherwise)
    lr            learning rate of the interval's last update
    expert_load   per MoE layer, each expert's share of the interval's routed pairs
    eplb          (``--eplb-interval`` runs, records whose interval re-placed the
                  experts) each re-placement's ``{"step", "before", "after"}``:
                  per MoE layer, max/mean per-rank load of the loads it planned
                  from, under the placement before and after it
                  (moe_ep/eplb/balancer.py)
    <name>_loss   the interval mean of every other loss part a trainer reports
                  (``StepResult.parts``; distillation: distill_loss, hidden_loss,
                  attention_loss, relation_loss, total_loss; multi-token prediction:
                  mtp_loss = lambda / D * sum_k CE_k and each depth's CE
                  mtp_<k>_loss, moe_ep/training/mtp.py), over every rank
    val_loss      validation cross-entropy (validation steps only)

A step is one optimizer step whatever its number of micro-batches: losses
are the step's means, pair counts and loads the step's sums.
The step-0 record holds only ``val_loss`` (nothing is trained yet).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
import torch
from tqdm import tqdm

from ..parallel.state import ParallelState
from .step import StepResult


class IntervalMeter:
    """Accumulates training metrics on the device between two records (no host sync per step).

    Time counts from ``begin_step`` to ``add`` of each step, plus the wait in
    ``flush`` for work still queued on the device.
    """

    def __init__(self, n_moe_layers: int, n_experts: int, tokens_per_step: int, device: torch.device):
        self.shape = (n_moe_layers, n_experts)
        self.tokens_per_step = tokens_per_step
        self.device = device
        self.reset()

    def reset(self) -> None:
        f64 = dict(dtype=torch.float64, device=self.device)
        self.sums = torch.zeros(7, **f64)  # loss, aux, grad_norm, routed, processed, dropped, max_vio
        self.part_sums: dict[str, torch.Tensor] = {}
        self.eplb: list[dict] = []
        self.load_LE = torch.zeros(self.shape, **f64)
        self.steps = 0
        self.skipped = 0
        self.lr = 0.0
        self.seconds = 0.0
        self.step_started = self.step_ended = time.perf_counter()

    def begin_step(self) -> None:
        """Start the clock of one training step."""
        self.step_started = time.perf_counter()

    def add(self, result: StepResult) -> None:
        """End a training step: its losses (local CE and parts, global aux), norm, lr and every micro-batch's MoE
        ``last_stats``."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        flat = [s for micro in result.stats for s in micro]
        pairs = [sum((getattr(s, name).double() for s in flat), zero)
                 for name in ("routed_pairs", "processed_pairs", "dropped_pairs")]
        max_vio = zero
        if flat:
            step_load_LE = torch.stack([torch.stack([s.tokens_per_expert.double() for s in micro])
                                        for micro in result.stats]).sum(0)
            mean_L1 = step_load_LE.mean(-1, keepdim=True).clamp_min(1e-9)
            max_vio = ((step_load_LE.max(-1, keepdim=True).values - mean_L1) / mean_L1).max()
            self.load_LE += step_load_LE
        grad_norm = result.grad_norm.double() if result.applied else zero
        self.sums += torch.stack([result.ce.double(), result.aux.double(), grad_norm, *pairs, max_vio])
        for name, value in result.parts.items():
            self.part_sums[name] = self.part_sums.get(name, zero) + value.double()
        if result.eplb is not None:
            self.eplb.append(result.eplb)
        self.steps += 1
        self.skipped += not result.applied
        self.lr = result.lr
        self.step_ended = time.perf_counter()
        self.seconds += self.step_ended - self.step_started

    def flush(self, parallel: ParallelState) -> dict:
        """The interval's record fields (collective: every rank calls it); then reset."""
        sums = self.sums.clone()
        names = sorted(self.part_sums)
        local = torch.stack([sums[0], *(self.part_sums[name] for name in names)])  # each rank's own losses
        local = (parallel.all_reduce_world(local) / parallel.world_size).tolist()
        values = [local[0]] + sums[1:].tolist()
        seconds = self.seconds + (time.perf_counter() - self.step_ended)  # + device work still queued
        loss, aux, grad_norm, routed, processed, dropped, max_vio = values
        if processed + dropped != routed:  # exact: float64 sums of integer counts
            raise RuntimeError(f"IntervalMeter: (token, expert) pairs lost: {routed:.0f} routed but "
                               f"{processed:.0f} processed + {dropped:.0f} dropped")
        n = max(self.steps, 1)
        share_LE = self.load_LE / self.load_LE.sum(-1, keepdim=True).clamp_min(1)
        applied = self.steps - self.skipped
        record = dict(loss=loss / n, aux_loss=aux / n,
                      tokens_per_s=self.tokens_per_step * self.steps / max(seconds, 1e-9),
                      dropped_frac=dropped / max(routed, 1.0), max_vio=max_vio / n,
                      grad_norm=grad_norm / applied if applied else float("nan"), skipped_steps=self.skipped,
                      lr=self.lr, routed_pairs=int(routed), processed_pairs=int(processed), dropped_pairs=int(dropped),
                      expert_load=[[round(v, 5) for v in row] for row in share_LE.tolist()],
                      **{f"{name}_loss": value / n for name, value in zip(names, local[1:])})
        if self.eplb:
            record["eplb"] = self.eplb
        self.reset()
        return record


class MetricsLog:
    """``metrics.jsonl`` writer (rank 0 only; other ranks write nothing).

    ``start_step > 0`` (a resumed run) keeps the records up to ``start_step``
    and drops later ones, so the file reads as one run; a record written
    again for ``start_step`` (the resumed run's first validation) is merged
    into the kept one.
    """

    def __init__(self, path: Path, enabled: bool, start_step: int = 0):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.kept = [r for r in read_metrics(path) if r["step"] <= start_step] if start_step and path.exists() else []
        self._rewrite()

    def _rewrite(self) -> None:
        with self.path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.kept)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.kept and self.kept[-1]["step"] == record["step"]:
            self.kept[-1] = {**self.kept[-1], **record}
            self._rewrite()
            return
        self.kept = []
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """Every record of a ``metrics.jsonl``."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """tqdm bar on rank 0 showing the latest record; silent elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")
        self.shown: dict = {}

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, record: dict) -> None:
        names = dict(loss="loss", aux_loss="aux", tokens_per_s="tok/s", dropped_frac="drop", max_vio="vio",
                     val_loss="val")
        formats = dict(tokens_per_s="{:.0f}", dropped_frac="{:.3f}", aux_loss="{:.2e}")
        for key, label in names.items():
            if key in record:
                self.shown[label] = formats.get(key, "{:.3f}").format(record[key])
        self.bar.set_postfix(self.shown, refresh=True)

    def close(self) -> None:
        self.bar.close()
