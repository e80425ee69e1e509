"""TensorBoard event files of a run's metrics records (the driver's ``--tensorboard``; rank 0 only).

``TensorBoardLog.write`` takes a record as written to ``metrics.jsonl`` (fields in
``moe_ep/training/metrics.py``) and writes each field it holds at the record's
``step``, flushing the file so a running TensorBoard shows it at once:

    loss/train                  loss
    loss/val                    val_loss
    loss/aux                    aux_loss
    loss/<name>                 any other numeric ``<name>_loss`` field, e.g.
                                distillation's ``distill_loss`` -> ``loss/distill``,
                                ``teacher_val_loss`` -> ``loss/teacher_val``
    throughput/tokens_per_s     tokens_per_s
    moe/dropped_frac            dropped_frac
    moe/max_vio                 max_vio
    moe/routed_pairs, moe/processed_pairs, moe/dropped_pairs
                                the pair counts of the same names
    optim/lr                    lr
    optim/grad_norm             grad_norm (NaN when every step of the interval was skipped)
    optim/skipped_steps         skipped_steps
    expert_load/layer<L>/expert<e>
                                scalar: expert ``e``'s load / mean load in MoE layer
                                ``L`` (its ``expert_load`` share x the number of
                                experts; 1 = balanced, 0 = idle), as in ``expert_load.png``
    expert_load/layer<L>        histogram of layer ``L``'s load / mean load over its experts

Other fields are not written. The per-expert tags sit under their own top-level
``expert_load/`` so TensorBoard's ``moe`` group keeps only the five run-wide numbers.
TensorBoard stores scalars as float32; ``metrics.jsonl`` keeps the exact values.

``tensorboard`` (the ``[train]`` extra) is imported only by an enabled log; a
disabled one (ranks other than 0, or no ``--tensorboard``) imports and creates
nothing.
"""
from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np

SCALAR_TAGS = {
    "loss": "loss/train", "val_loss": "loss/val", "aux_loss": "loss/aux",
    "tokens_per_s": "throughput/tokens_per_s",
    "dropped_frac": "moe/dropped_frac", "max_vio": "moe/max_vio", "routed_pairs": "moe/routed_pairs",
    "processed_pairs": "moe/processed_pairs", "dropped_pairs": "moe/dropped_pairs",
    "lr": "optim/lr", "grad_norm": "optim/grad_norm", "skipped_steps": "optim/skipped_steps",
}


def scalar_tag(field: str) -> str | None:
    """The tag of a scalar record field, or None for a field that is not written as a scalar."""
    if field in SCALAR_TAGS:
        return SCALAR_TAGS[field]
    if field.endswith("_loss"):
        return "loss/" + field.removesuffix("_loss")
    return None


class TensorBoardLog:
    """Writes metrics records as TensorBoard scalars and histograms under ``log_dir`` (when ``enabled``).

    ``start_step > 0`` (a resumed run) hides the earlier runs' events after
    ``start_step`` from TensorBoard (``SummaryWriter``'s ``purge_step``), and a
    fresh run (``start_step = 0``) hides all of them, so the curves read as one
    run, like ``MetricsLog``'s ``metrics.jsonl``.

    Raises ImportError, naming ``--tensorboard`` and the fix, when enabled and
    the ``tensorboard`` package cannot be imported.
    """

    def __init__(self, log_dir: Path, enabled: bool, start_step: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"--tensorboard needs the `tensorboard` package, which cannot be imported here ({e}); "
                              "install it with `pip install moe_ep[train]`, or run without --tensorboard") from e
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else 0)

    def write(self, record: dict) -> None:
        """Write the record's fields at ``record["step"]`` (tags in the module docstring) and flush."""
        if self.writer is None:
            return
        step = record["step"]
        for field, value in record.items():
            tag = scalar_tag(field)
            if tag is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
        for layer, shares in enumerate(record.get("expert_load", [])):
            ratios = np.asarray(shares, dtype=np.float64) * len(shares)
            for expert, ratio in enumerate(ratios):
                self.writer.add_scalar(f"expert_load/layer{layer}/expert{expert}", ratio, step)
            self.writer.add_histogram(f"expert_load/layer{layer}", ratios, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (nothing when disabled)."""
        if self.writer is not None:
            self.writer.close()
