"""Command-line flags shared by the launchers: the model to train, the loop's schedule and its outputs."""
from __future__ import annotations

import argparse

from ..models import MODEL_PRESETS
from .config import PRECISIONS, TrainConfig

_DEFAULTS = TrainConfig()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--moe``, ``--hf-model``, ``--save-hf``, ``--ep-size``, ``--nodes``: what is trained, on what layout."""
    p = parser
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model preset (default tiny)")
    p.add_argument("--moe", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an MoEConfig field of the preset, e.g. --moe n_group=2 (repeatable)")
    p.add_argument("--hf-model", default=None, metavar="DIR",
                   help="train this transformers DeepSeek V2/V3 causal LM folder instead of a preset "
                        "(--moe then sets moe_ep-only fields; docs/interop.md)")
    p.add_argument("--save-hf", default=None, metavar="DIR",
                   help="with --hf-model: write the trained model as a transformers folder at the end")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size; must divide the world size")
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes one EP group spans (default: from the launcher's LOCAL_WORLD_SIZE); set it to "
                        "emulate nodes")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--steps``, ``--seq-len``, ``--min-lr-ratio``, ``--warmup``: the flags every launcher's schedule takes."""
    p = parser
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps in total")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's max)")
    p.add_argument("--min-lr-ratio", type=float, default=_DEFAULTS.min_lr_ratio, help="final lr / peak lr")
    p.add_argument("--warmup", type=int, default=_DEFAULTS.warmup_steps, help="linear warmup steps")


def add_run_arguments(parser: argparse.ArgumentParser, out_default: str, ckpt_help: str) -> None:
    """Logging, validation, checkpoint interval, data, seed, output folder and activation checkpointing."""
    p = parser
    p.add_argument("--log-every", type=int, default=_DEFAULTS.log_every, help="steps between metrics records")
    p.add_argument("--val-every", type=int, default=_DEFAULTS.val_every, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=_DEFAULTS.val_batches, help="validation batches per rank")
    p.add_argument("--ckpt-every", type=int, default=_DEFAULTS.ckpt_every, help=ckpt_help)
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib sources)")
    p.add_argument("--max-data-bytes", type=int, default=8 << 20, help="cap on the training split size")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="initialisation and data order")
    p.add_argument("--out", default=out_default, help="output folder (metrics, plots, checkpoints)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each transformer block's input and recompute the block in backward")


def add_loop_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    """The flags of every ``TrainConfig`` field, plus ``--data`` and ``--max-data-bytes`` for the corpus."""
    p = parser
    add_schedule_arguments(p)
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    p.add_argument("--grad-clip", type=float, default=_DEFAULTS.grad_clip, help="max global grad norm; 0: off")
    p.add_argument("--precision", default=_DEFAULTS.precision, choices=PRECISIONS,
                   help="bf16: autocast with fp32 weights, gradients and AdamW state (default fp32)")
    p.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum,
                   help="micro-batches per optimizer step, each batch-size / grad-accum sequences (default 1)")
    add_run_arguments(p, out_default, ckpt_help="steps between checkpoints; 0: none (default)")


def loop_config(args: argparse.Namespace, default_seq_len: int = _DEFAULTS.seq_len) -> TrainConfig:
    """The ``TrainConfig`` of flags added by ``add_loop_arguments`` (``--seq-len`` falls back to ``default_seq_len``)."""
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len or default_seq_len,
                       lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, log_every=args.log_every,
                       val_every=args.val_every, ckpt_every=args.ckpt_every, val_batches=args.val_batches,
                       seed=args.seed, out_dir=args.out, precision=args.precision, grad_accum=args.grad_accum,
                       activation_checkpointing=args.activation_checkpointing)
