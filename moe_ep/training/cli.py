"""Command-line flags of the training loop (``TrainConfig``), shared by the launchers that run it."""
from __future__ import annotations

import argparse

from .config import PRECISIONS, TrainConfig

_DEFAULTS = TrainConfig()


def add_loop_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    """The flags of every ``TrainConfig`` field, plus ``--data`` and ``--max-data-bytes`` for the corpus."""
    p = parser
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's max)")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=_DEFAULTS.min_lr_ratio, help="final lr / peak lr")
    p.add_argument("--warmup", type=int, default=_DEFAULTS.warmup_steps, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    p.add_argument("--grad-clip", type=float, default=_DEFAULTS.grad_clip, help="max global grad norm; 0: off")
    p.add_argument("--log-every", type=int, default=_DEFAULTS.log_every, help="steps between metrics records")
    p.add_argument("--val-every", type=int, default=_DEFAULTS.val_every, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=_DEFAULTS.val_batches, help="validation batches per rank")
    p.add_argument("--ckpt-every", type=int, default=_DEFAULTS.ckpt_every,
                   help="steps between checkpoints; 0: none (default)")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib sources)")
    p.add_argument("--max-data-bytes", type=int, default=8 << 20, help="cap on the training split size")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="initialisation and data order")
    p.add_argument("--out", default=out_default, help="output folder (metrics, plots, checkpoints)")
    p.add_argument("--precision", default=_DEFAULTS.precision, choices=PRECISIONS,
                   help="bf16: autocast with fp32 weights, gradients and AdamW state (default fp32)")
    p.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum,
                   help="micro-batches per optimizer step, each batch-size / grad-accum sequences (default 1)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each transformer block's input and recompute the block in backward")


def loop_config(args: argparse.Namespace, default_seq_len: int = _DEFAULTS.seq_len) -> TrainConfig:
    """The ``TrainConfig`` of flags added by ``add_loop_arguments`` (``--seq-len`` falls back to ``default_seq_len``)."""
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len or default_seq_len,
                       lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, log_every=args.log_every,
                       val_every=args.val_every, ckpt_every=args.ckpt_every, val_batches=args.val_batches,
                       seed=args.seed, out_dir=args.out, precision=args.precision, grad_accum=args.grad_accum,
                       activation_checkpointing=args.activation_checkpointing)
