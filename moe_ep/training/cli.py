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
from ..models.upcycle import UpcycleError, upcycled_config
from ..parallel.state import ParallelState, nodes_per_ep_group
from .config import PRECISIONS, TrainConfig, parse_field_overrides
from .model_source import dense_checkpoint, preset_config, upcycle_segments
from .mtp import DEFAULT_MTP_WEIGHT

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


def non_negative_int(text: str) -> int:
    """argparse type: an int of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative int, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--moe``, ``--mtp-depth``, ``--mtp-weight``, ``--hf-model``, ``--save-hf``, ``--ep-size``,
    ``--nodes``: what is trained, on what layout."""
    p = parser
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model preset (default tiny)")
    p.add_argument("--moe", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an MoEConfig field of the preset, e.g. --moe n_group=2 (repeatable)")
    p.add_argument("--mtp-depth", type=non_negative_int, default=0, metavar="D",
                   help="DeepSeek-V3 multi-token prediction: D sequential MTP modules after the preset model, module k "
                        "predicting token i+k+1 (default 0: none; docs/training.md)")
    p.add_argument("--mtp-weight", type=finite_float, default=DEFAULT_MTP_WEIGHT, metavar="LAMBDA",
                   help=f"with --mtp-depth: the MTP loss is LAMBDA / D * sum_k CE_k (default {DEFAULT_MTP_WEIGHT}, "
                        f"V3's first value; V3 later used 0.1)")
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
    """``--pp-size`` (when the launcher has it) divides the world (``WORLD_SIZE`` of torchrun or the deepspeed
    launcher; 1 without), ``--ep-size`` divides the world / ``--pp-size``,
    ``--nodes`` divides ``--ep-size``, and ``model``'s MoE layers (when given and it has some) can be sharded
    so (``moe_ep.layer.check_layout``)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    pp_size = getattr(args, "pp_size", 1)
    if world % pp_size:
        hint = "; start several processes with torchrun" if world == 1 else ""
        parser.error(f"argument --pp-size: {pp_size} does not divide the world size {world}{hint}")
    world //= pp_size  # the ranks of one pipeline stage
    if world % args.ep_size:
        hint = "; start several processes with torchrun" if world == 1 and pp_size == 1 else ""
        staged = f" / --pp-size {pp_size}" if pp_size > 1 else ""
        parser.error(f"argument --ep-size: {args.ep_size} does not divide the world size{staged} {world}{hint}")
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
    if args.mtp_weight < 0:
        parser.error(f"argument --mtp-weight: must be non-negative, got {args.mtp_weight}")
    if args.hf_model and args.mtp_depth:
        parser.error("argument --mtp-depth: MTP modules are built for a preset model, not for --hf-model (a "
                     "transformers DeepSeek model does not run its MTP layers)")
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
        model = preset_config(args.preset, args.moe, args.mtp_depth)
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


class _UpcycleMode(argparse.Action):
    """``--upcycle coarse`` -> ``("coarse", None)``; ``--upcycle fine M`` -> ``("fine", M)``, M a positive int."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == ["coarse"]:
            setattr(namespace, self.dest, ("coarse", None))
        elif len(values) == 2 and values[0] == "fine" and values[1].isdigit() and int(values[1]) > 0:
            setattr(namespace, self.dest, ("fine", int(values[1])))
        else:
            raise argparse.ArgumentError(self, f"expected 'coarse' or 'fine M' (M a positive int), got "
                                               f"{' '.join(values)!r}")


# UpcycleError.source -> the flag that sets it
_UPCYCLE_FLAGS = {"dense": "--upcycle-from", "segments": "--upcycle", "first_k_dense": "--first-k-dense",
                  "moe": "--moe"}


def add_upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    """``--upcycle-from``, ``--upcycle``, ``--first-k-dense``: start from a dense checkpoint made MoE
    (``moe_ep.models.upcycle``)."""
    p = parser
    p.add_argument("--upcycle-from", default=None, metavar="DENSE_CKPT",
                   help="train this dense model's checkpoint (or a run folder's latest) made MoE: its own model "
                        "config, --moe overrides for the MoE fields (docs/training.md, 'Upcycling')")
    p.add_argument("--upcycle", nargs="+", action=_UpcycleMode, default=None, metavar=("MODE", "M"),
                   help="coarse (default): every routed expert a copy of the dense FFN; fine M: DeepSeekMoE "
                        "segmentation, experts and shared experts 1/M slices of it")
    p.add_argument("--first-k-dense", type=int, default=None,
                   help="with --upcycle-from: leading blocks kept dense, the others become MoE (default 1)")


def check_upcycle_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ModelConfig | None:
    """The flags of ``add_upcycle_arguments``; returns the upcycled ``ModelConfig``
    (``moe_ep.models.upcycle.upcycled_config`` of the checkpoint's config, the mode, ``--first-k-dense`` and the
    ``--moe`` overrides), None without ``--upcycle-from``.

    An override that contradicts what the mode needs to compute the dense function at step 0 names ``--moe``;
    ``--upcycle`` and ``--first-k-dense`` without ``--upcycle-from`` and ``--hf-model`` / ``--save-hf`` with it
    are refused.
    """
    if args.upcycle_from is None:
        for flag in ("--upcycle", "--first-k-dense"):
            if flag_value(args, flag) is not None:
                parser.error(f"argument {flag}: needs --upcycle-from")
        return None
    for flag in ("--hf-model", "--save-hf"):
        if flag_value(args, flag):
            parser.error(f"argument {flag}: not with --upcycle-from (only a moe_ep checkpoint is upcycled)")
    if args.mtp_depth:
        parser.error("argument --mtp-depth: not with --upcycle-from (the upcycled model keeps the dense "
                     "checkpoint's mtp_depth, its MTP blocks upcycled like the others)")
    with blame(parser, "--upcycle-from"):
        _, dense = dense_checkpoint(args.upcycle_from)
    with blame(parser, "--moe"):
        try:
            model = upcycled_config(dense, upcycle_segments(args), args.first_k_dense, parse_field_overrides(args.moe))
        except UpcycleError as err:
            parser.error(f"argument {_UPCYCLE_FLAGS[err.source]}: {err}")
    check_layout_arguments(parser, args, model)
    return model


def add_eplb_arguments(parser: argparse.ArgumentParser) -> None:
    """``--eplb-interval``: re-place the experts every N steps (moe_ep/eplb/balancer.py; docs/eplb.md)."""
    parser.add_argument("--eplb-interval", type=int, default=0, metavar="N",
                        help="every N optimizer steps, re-plan each MoE layer's expert placement from the last N "
                             "steps' loads and move its weights and AdamW moments (with --moe redundant_experts=R: "
                             "R replica slots per layer); 0: never (default)")


def check_eplb_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         model: ModelConfig | None) -> None:
    """``--eplb-interval`` is non-negative and, when set, ``model`` (if known) has MoE layers to place."""
    if args.eplb_interval < 0:
        parser.error(f"argument --eplb-interval: must be a non-negative int, got {args.eplb_interval}")
    if args.eplb_interval and model is not None and not model.n_moe_layers:
        parser.error("argument --eplb-interval: the model has no MoE layer")


def layer_counts(text: str) -> list[int]:
    """``--pp-layers 3,5``: blocks per pipeline stage, non-negative ints."""
    parts = text.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative ints (blocks per stage), got {text!r}")
    return [int(part) for part in parts]


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pp-size``, ``--pp-schedule``, ``--pp-layers``, ``--pp-overlap`` (launch/train.py; docs/pipeline.md)."""
    from .pipeline import SCHEDULES

    p = parser
    p.add_argument("--pp-size", type=positive_int, default=1,
                   help="pipeline stages' ranks: the world is pp x dp x ep (default 1: no pipeline)")
    p.add_argument("--pp-schedule", default="1f1b", choices=list(SCHEDULES),
                   help="torch.distributed.pipelining schedule; the micro-batches are --grad-accum's (default 1f1b)")
    p.add_argument("--pp-layers", type=layer_counts, default=None, metavar="N0,N1,...",
                   help="transformer blocks per stage, in stage order (2 stages per rank for interleaved-1f1b, zbv "
                        "and dualpipev); default: balanced")
    p.add_argument("--pp-overlap", action="store_true",
                   help="with --pp-schedule dualpipev: overlap each paired forward and backward at the MoE "
                        "all-to-alls (DeepSeek-V3's computation-communication overlap)")


def check_pipeline_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, config: TrainConfig,
                             model: ModelConfig | None) -> None:
    """The schedule can run ``--grad-accum`` micro-batches at ``--pp-size``; ``--pp-layers`` gives each stage's
    blocks of ``model``; ``--pp-overlap`` only with dualpipev; no ``--eplb-interval`` nor ``--save-hf``."""
    from ..models.pipeline import split_blocks
    from .pipeline import SCHEDULES, schedule_problem

    pipelined = args.pp_size > 1
    for flag in ("--pp-layers", "--pp-overlap"):
        if flag_value(args, flag) and not pipelined:
            parser.error(f"argument {flag}: needs --pp-size > 1")
    if not pipelined:
        return
    if getattr(args, "eplb_interval", 0):
        parser.error("argument --eplb-interval: expert re-placement runs with --pp-size 1 only")
    if args.save_hf:
        parser.error("argument --save-hf: not with --pp-size > 1 (no rank holds the whole model); write the folder "
                     "from the run's last checkpoint at --pp-size 1: the same flags with --resume OUT --save-hf DIR "
                     "(docs/pipeline.md)")
    if args.pp_overlap and args.pp_schedule != "dualpipev":
        parser.error(f"argument --pp-overlap: only --pp-schedule dualpipev pairs a forward with a backward, "
                     f"not {args.pp_schedule}")
    problem = schedule_problem(args.pp_schedule, args.pp_size, config.grad_accum)
    if problem:
        parser.error(f"argument --pp-schedule: {problem}")
    if model is not None:
        with blame(parser, "--pp-layers" if args.pp_layers else "--pp-size"):
            split_blocks(model.n_layers, args.pp_size * SCHEDULES[args.pp_schedule][2], args.pp_layers)
