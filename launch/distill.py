"""Distil a trained teacher into a student on the byte corpus, on one process or under torchrun.

    torchrun --standalone --nproc_per_node 2 launch/distill.py --teacher runs/teacher --student-preset tiny-dense \\
        --ep-size 2 --steps 200 --out runs/distilled
    python launch/distill.py --teacher runs/teacher --student-preset tiny --steps 200 --out runs/distilled-1proc

``--teacher`` and ``--student`` take a launch/train.py output folder (its
latest complete checkpoint), a checkpoint folder, or a transformers model
folder (``config.json``; vocabulary of 256 byte tokens). ``--student-preset``
builds a fresh student exactly as ``launch/train.py --preset`` does with the
same ``--seed``, and the batches are those launch/train.py draws for the same
seed, batch size, sequence length and world size: a label-only baseline is
``launch/train.py`` with the same flags. Under torchrun our MoE models are
sharded over ``--ep-size`` (moe_ep.init_expert_parallel), the teacher without
dropping. Outputs in ``--out``: ``run.json``, ``metrics.jsonl`` (training's
fields plus the loss parts), ``loss.png``, ``expert_load.png``,
``loss_parts.png``, ``result.json`` and, with ``--ckpt-every``, the student
(``ckpt/`` or ``save_pretrained`` files). docs/distillation.md has the details.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch/train.py's setup_parallel

from train import setup_parallel  # noqa: E402

from moe_ep.data import VOCAB_SIZE, BatchSampler, load_corpus  # noqa: E402
from moe_ep.distill import Distiller  # noqa: E402
from moe_ep.distill.adapters import DTYPES, lm_shape  # noqa: E402
from moe_ep.distill.loop import distill  # noqa: E402
from moe_ep.distill.checkpoints import checkpoint_folder  # noqa: E402
from moe_ep.distill.losses import DISTILL_METHODS, DistillationLoss  # noqa: E402
from moe_ep.models import MODEL_PRESETS, MoETransformerLM  # noqa: E402
from moe_ep.training.cli import (LOOP_FLAGS, add_layout_arguments, add_loop_arguments, blame,  # noqa: E402
                                 check_layout_arguments, check_run_arguments, finite_float, flag_value, loop_config)
from moe_ep.training.model_source import preset_config, run_record  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher folder (train.py run, checkpoint or transformers)")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student-preset", choices=sorted(MODEL_PRESETS), help="a fresh student of this preset")
    student.add_argument("--student", help="student folder (train.py run, checkpoint or transformers)")
    p.add_argument("--moe", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an MoEConfig field of the student preset (repeatable)")
    add_layout_arguments(p)
    p.add_argument("--temperature", type=finite_float, default=2.0, help="softmax temperature T of the KD terms")
    p.add_argument("--alpha", type=finite_float, default=0.5,
                   help="weight of the distillation term; 1 - alpha: labels")
    p.add_argument("--method", default="kd", choices=DISTILL_METHODS, help="logit distillation loss")
    p.add_argument("--hidden-weight", type=finite_float, default=0.0, help="weight of the hidden-state MSE")
    p.add_argument("--attention-weight", type=finite_float, default=0.0, help="weight of the attention-map KL")
    p.add_argument("--relation-weight", type=finite_float, default=0.0, help="weight of the token-relation MSE")
    p.add_argument("--teacher-dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--student-dtype", default="float32", choices=sorted(DTYPES))
    add_loop_arguments(p, out_default="runs/distill")
    return p


# DistillationLoss argument -> its flag
LOSS_FLAGS = {"temperature": "--temperature", "alpha": "--alpha", "hidden_loss_weight": "--hidden-weight",
              "attention_loss_weight": "--attention-weight", "relation_loss_weight": "--relation-weight"}
# What the Distiller refuses (one fp32 batch per step, no checkpointing): flag -> the only value it takes
PLAIN_LOOP = {"--precision": "fp32", "--grad-accum": 1, "--activation-checkpointing": False}


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked before any work (``moe_ep.training.cli``): one that cannot work exits with status 2."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.moe and not args.student_preset:
        p.error("argument --moe: overrides a --student-preset")
    for flag, folder in (("--teacher", args.teacher), ("--student", args.student)):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            with blame(p, flag):
                checkpoint_folder(Path(folder))
    model = None
    if args.student_preset:
        with blame(p, "--moe"):
            model = preset_config(args.student_preset, args.moe)
    check_layout_arguments(p, args, model)
    with blame(p, LOSS_FLAGS):
        DistillationLoss(args.temperature, args.alpha, args.hidden_weight, args.attention_weight,
                         args.relation_weight, args.method, layers=(1, 1), hidden_sizes=(1, 1))
    for flag, plain in PLAIN_LOOP.items():
        if flag_value(args, flag) != plain:
            p.error(f"argument {flag}: distillation runs one fp32 batch per step without checkpointing; "
                    f"leave {flag} at {plain}")
    with blame(p, LOOP_FLAGS):
        cfg = loop_config(args, model.max_seq_len) if model else loop_config(args)
    check_run_arguments(p, args, cfg, model)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    parallel, device = setup_parallel(args.ep_size, args.nodes)
    rank = dist.get_rank() if parallel.distributed else 0
    if args.student_preset:
        student_cfg = preset_config(args.student_preset, args.moe)
        student = MoETransformerLM(student_cfg, parallel, seed=args.seed)
        cfg = loop_config(args, default_seq_len=student_cfg.max_seq_len)
    else:
        student = args.student
        cfg = loop_config(args)
    torch.manual_seed(cfg.seed + rank)  # training-time noise (router jitter), as launch/train.py
    distiller = Distiller(args.teacher, student, temperature=args.temperature, alpha=args.alpha,
                          hidden_loss_weight=args.hidden_weight, attention_loss_weight=args.attention_weight,
                          relation_loss_weight=args.relation_weight, distill_method=args.method, device=device,
                          teacher_dtype=args.teacher_dtype, student_dtype=args.student_dtype, parallel=parallel,
                          train_config=cfg)
    for who, model in (("teacher", distiller.teacher), ("student", distiller.student)):
        if lm_shape(model).vocab_size != VOCAB_SIZE:
            raise SystemExit(f"--{who}: vocabulary of {lm_shape(model).vocab_size} tokens; the byte corpus needs "
                             f"{VOCAB_SIZE}")
    corpus = load_corpus(args.data, max_bytes=args.max_data_bytes)
    sampler = BatchSampler(corpus, cfg.batch_size, cfg.seq_len, cfg.seed, rank, parallel.world_size)
    out = Path(args.out)
    counts = {who: dataclasses.asdict(model.parameter_counts()) for who, model in (("teacher", distiller.teacher),
                                                                      ("student", distiller.student))}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        student_model = (distiller.student.config.to_dict() if isinstance(distiller.student, MoETransformerLM)
                         else distiller.student.hf.config.to_dict())
        run_info = run_record(student_model, cfg, parallel, device, corpus, teacher=args.teacher,
                              student=args.student or args.student_preset,
                              distill={k: getattr(args, k) for k in ("temperature", "alpha", "method", "hidden_weight",
                                                                      "attention_weight", "relation_weight",
                                                                      "teacher_dtype", "student_dtype")},
                              parameters=counts)
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        print(f"[moe_ep] distil {args.teacher} ({counts['teacher']['total'] / 1e6:.2f}M parameters, "
              f"{counts['teacher']['activated'] / 1e6:.2f}M activated) into {run_info['student']} "
              f"({counts['student']['total'] / 1e6:.2f}M, {counts['student']['activated'] / 1e6:.2f}M activated), "
              f"world {parallel.world_size} (dp {parallel.dp_size} x ep {parallel.ep_size}), {device}", flush=True)

    result = distill(distiller, sampler, out)

    if rank == 0:
        steps = sorted(result.val_losses)
        summary = dict(teacher_val_loss=result.teacher_val_loss, student_val_loss=result.val_losses[steps[-1]],
                       val_losses=result.val_losses, parameters=counts,
                       wall_seconds=time.perf_counter() - started, saved=str(result.saved) if result.saved else None)
        (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[moe_ep] teacher val loss {result.teacher_val_loss:.3f}; student val loss "
              f"{result.val_losses[steps[0]]:.3f} (step {steps[0]}) -> {result.val_losses[steps[-1]]:.3f} "
              f"(step {steps[-1]})", flush=True)
        print(f"[moe_ep] metrics: {out / 'metrics.jsonl'}; plots: loss.png, expert_load.png, loss_parts.png",
              flush=True)
    if parallel.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
