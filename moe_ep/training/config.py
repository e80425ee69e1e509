"""``TrainConfig``: every knob of the training loop."""
from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass

from ..config import check_field_types

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Training loop settings.

    steps: optimizer steps in total (a resumed run continues up to it).
    batch_size: sequences per rank per step; the global batch is
        ``batch_size * world_size`` sequences of ``seq_len`` tokens.
    lr, min_lr_ratio, warmup_steps: linear warmup to ``lr`` over
        ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``.
    weight_decay, beta1, beta2: AdamW (decay on matrices only).
    grad_clip: max global gradient L2 norm (None: no clipping).
    log_every / val_every / ckpt_every: steps between metrics records,
        validations and checkpoints (0 disables checkpoints); the last step
        always logs, validates and checkpoints (when enabled).
    val_batches: validation batches per rank.
    seed: model initialisation and data order.
    out_dir: metrics.jsonl, plots and ckpt/ go here.
    precision: ``fp32`` or ``bf16`` (autocast; weights, gradients and AdamW
        state stay fp32); moe_ep/training/step.py.
    grad_accum: micro-batches per optimizer step; each is ``batch_size /
        grad_accum`` sequences (the step's batch is unchanged).
    activation_checkpointing: checkpoint every transformer block
        (moe_ep/activation_checkpointing.py).

    Resuming from a checkpoint requires the checkpoint's values of the fields
    in ``moe_ep.checkpoint.save_load.TRAJECTORY_FIELDS`` and its global batch
    size (``batch_size * world_size``); ``steps`` and the logging fields may change.
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    log_every: int = 10
    val_every: int = 50
    ckpt_every: int = 0
    val_batches: int = 4
    seed: int = 0
    out_dir: str = "runs/train"
    precision: str = "fp32"
    grad_accum: int = 1
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        """Raise ``ValueError`` ``TrainConfig.<field>: ...`` naming the first field of a wrong type or value."""
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{field}: {why}")

        check_field_types(self)
        for name in ("steps", "batch_size", "seq_len", "log_every", "val_every", "val_batches", "grad_accum"):
            need(getattr(self, name) >= 1, name, f"must be a positive int, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "ckpt_every", "seed"):
            need(getattr(self, name) >= 0, name, f"must be non-negative, got {getattr(self, name)!r}")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a finite positive number, got {self.lr!r}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio!r}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             f"must be a finite non-negative number, got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1, name, f"must lie in [0, 1), got {getattr(self, name)!r}")
        if self.grad_clip is not None:
            need(math.isfinite(self.grad_clip) and self.grad_clip > 0, "grad_clip",
                 f"must be a finite positive number or None, got {self.grad_clip!r}")
        need(self.batch_size % self.grad_accum == 0, "grad_accum",
             f"{self.grad_accum} micro-batches do not divide batch_size {self.batch_size}")
        need(self.precision in PRECISIONS, "precision", f"{self.precision!r} is not one of {PRECISIONS} (fp16 needs "
             f"loss scaling: use DeepSpeed's fp16, launch/ds_config_fp16.json)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_field_overrides(items: list[str]) -> dict:
    """``FIELD=VALUE`` strings (the launchers' ``--moe``) to a dict; values are Python literals where they parse, else strings.

    ``ValueError`` for an item without ``=``.
    """
    out = {}
    for item in items:
        field, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected FIELD=VALUE")
        try:
            out[field] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[field] = raw
    return out
