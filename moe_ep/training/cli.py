"""Command-line flags shared by the launchers, and their checks before any work starts.

``add_*_arguments`` add the flags: the model to train, the loop's schedule and
its outputs. ``check_*_arguments`` check what the flags mean together (the
configs they build, the files they name, the layout they ask for) right after
parsing, in every process and before a process group, a model or a file
exists: a flag that cannot work ends the launcher through argparse's error
(exit status 2, ``argument --flag: why``), never a traceback later.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

from ..checkpoint import read_manifest
from ..config import MoEConfig, hf_config_fields
from ..data import user_files
from ..layer import check_layout
from ..models import MODEL_PRESETS, ModelConfig
from ..parallel.state import ParallelState, nodes_per_ep_group
from .config import PRECISIONS, TrainConfig, parse_field_overrides
from .model_source import preset_config

_DEFAULTS = TrainConfig()
# TrainConfig field -> the flag that sets it (loop_config); every other field keeps its default.
LOOP_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "seq_len": "--seq-len", "lr": "--lr",
              "min_lr_ratio": "--min-lr-ratio", "warmup_steps": "--warmup", "weight_decay": "--weight-decay",
              "grad_clip": "--grad-clip", "log_every": "--log-every", "val_every": "--val-every",
              "ckpt_every": "--ckpt-every", "val_batches": "--val-batches", "seed": "--seed", "out_dir": "--out",
              "precision": "--precision", "grad_accum": "--grad-accum",
              "activation_checkpointing": "--activation-checkpointing"}
_NAMED_FIELD = re.compile(r"\w+\.(\w+): ")  # the configs' errors start "<Config>.<field>: "


def positive_int(text: str) -> int:
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a number other than nan and inf."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def flag_value(args: argparse.Namespace, flag: str):
    """The parsed value of ``flag`` (``--grad-accum``: ``args.grad_accum``)."""
    return getattr(args, flag[2:].replace("-", "_"))


@contextlib.contextmanager
def blame(parser: argparse.ArgumentParser, flag: str | Mapping[str, str]) -> Iterator[None]:
    """A ``ValueError`` or ``OSError`` raised inside ends in ``parser.error`` (exit status 2) naming a flag.

    ``flag``: the flag, or a mapping from config fields to flags, for a
    config whose errors start ``<Config>.<field>: `` (how the configs name
    their fields).
    """
    try:
        yield
    except (ValueError, OSError) as err:
        if not isinstance(flag, str):
            named = _NAMED_FIELD.match(str(err))
            flag = flag.get(named.group(1)) if named else None
        parser.error(f"argument {flag}: {err}" if flag else str(err))


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
    add_layout_arguments(p)


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ep-size`` and ``--nodes``."""
    parser.add_argument("--ep-size", type=positive_int, default=1,
                        help="expert-parallel size; must divide the world size")
    parser.add_argument("--nodes", type=positive_int, default=None,
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
    """Logging, validation, checkpoint interval, data, seed, output folder, activation checkpointing, TensorBoard."""
    p = parser
    p.add_argument("--log-every", type=int, default=_DEFAULTS.log_every, help="steps between metrics records")
    p.add_argument("--val-every", type=int, default=_DEFAULTS.val_every, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=_DEFAULTS.val_batches, help="validation batches per rank")
    p.add_argument("--ckpt-every", type=int, default=_DEFAULTS.ckpt_every, help=ckpt_help)
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib sources)")
    p.add_argument("--max-data-bytes", type=positive_int, default=8 << 20, help="cap on the training split size")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="initialisation and data order")
    p.add_argument("--out", default=out_default, help="output folder (metrics, plots, checkpoints)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each transformer block's input and recompute the block in backward")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT/tensorboard (needs moe_ep[train])")


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


def seq_len(args: argparse.Namespace, default: int) -> int:
    """``--seq-len``, or ``default`` when it is not given (a given 0 stays 0, for ``TrainConfig`` to refuse)."""
    return default if args.seq_len is None else args.seq_len


def loop_config(args: argparse.Namespace, default_seq_len: int = _DEFAULTS.seq_len) -> TrainConfig:
    """The ``TrainConfig`` of flags added by ``add_loop_arguments`` (``--seq-len`` falls back to ``default_seq_len``,
    ``--grad-clip 0`` is None); check it with ``blame(parser, LOOP_FLAGS)``."""
    values = {field: flag_value(args, flag) for field, flag in LOOP_FLAGS.items()}
    values.update(seq_len=seq_len(args, default_seq_len), grad_clip=args.grad_clip or None)
    return TrainConfig(**values)


def check_layout_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           model: ModelConfig | None) -> None:
    """``--ep-size`` divides the world (``WORLD_SIZE`` of torchrun or the deepspeed launcher; 1 without),
    ``--nodes`` divides ``--ep-size``, and ``model``'s MoE layers (when given and it has some) can be sharded
    so (``moe_ep.layer.check_layout``)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % args.ep_size:
        hint = "; start several processes with torchrun" if world == 1 else ""
        parser.error(f"argument --ep-size: {args.ep_size} does not divide the world size {world}{hint}")
    if args.nodes is not None and args.ep_size % args.nodes:
        parser.error(f"argument --nodes: {args.nodes} nodes do not divide --ep-size {args.ep_size}")
    if model is not None and model.n_moe_layers:
        with blame(parser, "--ep-size"):
            nodes = args.nodes or nodes_per_ep_group(args.ep_size, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            check_layout(model.moe, ParallelState(ep_size=args.ep_size, nodes=nodes))


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ModelConfig | None:
    """The flags of ``add_model_arguments``; returns the preset's ``ModelConfig`` with the ``--moe`` overrides
    (None for ``--hf-model``, whose config comes from its folder).

    ``--hf-model``: a folder with ``config.json`` whose config ``MoEConfig.from_hf_config`` reads with the
    ``--moe`` overrides (the overrides are checked against the model's own MoE blocks later, by
    ``moe_ep.hf_model.expert_parallelize``, on every rank before training).
    """
    if args.save_hf and not args.hf_model:
        parser.error("argument --save-hf: needs --hf-model (a preset model is not a transformers model)")
    if args.hf_model:
        if not (Path(args.hf_model) / "config.json").is_file():
            parser.error(f"argument --hf-model: {args.hf_model} has no config.json (expected a folder written by "
                         f"save_pretrained)")
        from transformers import AutoConfig

        with blame(parser, "--hf-model"):
            hf_config = AutoConfig.from_pretrained(args.hf_model)
            hf_config_fields(hf_config)  # a DeepSeek V2/V3 config
        with blame(parser, "--moe"):
            MoEConfig.from_hf_config(hf_config, **parse_field_overrides(args.moe))
        check_layout_arguments(parser, args, None)
        return None
    with blame(parser, "--moe"):
        model = preset_config(args.preset, args.moe)
    check_layout_arguments(parser, args, model)
    return model


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, config: TrainConfig,
                        model: ModelConfig | None) -> None:
    """``--data`` names a readable corpus, ``--out`` is not a file, and ``--seq-len`` fits ``model``'s RoPE table."""
    if args.data is not None:
        with blame(parser, "--data"):
            user_files(Path(args.data))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"argument --out: {args.out} is a file, not a folder")
    if model is not None and config.seq_len > model.max_seq_len:
        parser.error(f"argument --seq-len: {config.seq_len} exceeds the model's max_seq_len {model.max_seq_len}")


def check_checkpoint_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """``folder`` is a complete moe_ep checkpoint (its manifest reads)."""
    with blame(parser, flag):
        read_manifest(Path(folder))
