"""launch/distill.py after its flags were parsed and checked: the distiller on the training driver.

On every rank: the parallel state and device (``training.runs.setup_parallel``), the student (a fresh
``--student-preset`` built exactly as ``launch/train.py --preset`` does with the same ``--seed``, or a
folder), the ``Distiller``, the batches ``launch/train.py`` draws for the same seed, batch size, sequence
length and world size, then ``training.driver.run``: the metrics of training plus the loss parts, the
teacher's validation loss in the first record, the plots (``loss_parts.png`` among them) and, with
``--ckpt-every``, the student. Rank 0 also writes ``run.json`` and ``result.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ..data import VOCAB_SIZE, load_corpus
from ..model_moe import parameter_counts
from ..models import MoETransformerLM
from ..training.cli import loop_config
from ..training.driver import RunResult, run
from ..training.model_source import preset_config, run_record
from ..training.runs import announce, finish, report, sampler_for, seed_training_noise, setup_parallel
from .adapters import lm_shape
from .distiller import Distiller

PREFIX = "[moe_ep]"
SETTINGS = ("temperature", "alpha", "method", "hidden_weight", "attention_weight", "relation_weight",
            "teacher_dtype", "student_dtype")


def distill_run(args: argparse.Namespace) -> RunResult:
    """The distillation run of ``args`` (module docstring)."""
    started = time.perf_counter()
    parallel, device = setup_parallel(args.ep_size, args.nodes)
    if args.student_preset:
        student_cfg = preset_config(args.student_preset, args.moe)
        student = MoETransformerLM(student_cfg, parallel, seed=args.seed)
        cfg = loop_config(args, default_seq_len=student_cfg.max_seq_len)
    else:
        student = args.student
        cfg = loop_config(args)
    seed_training_noise(cfg, parallel)
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
    sampler = sampler_for(corpus, cfg, parallel)
    out = Path(cfg.out_dir)
    counts = {who: dataclasses.asdict(parameter_counts(model))
              for who, model in (("teacher", distiller.teacher), ("student", distiller.student))}
    student_model = (distiller.student.config.to_dict() if isinstance(distiller.student, MoETransformerLM)
                     else distiller.student.hf.config.to_dict())
    student_name = args.student or args.student_preset
    announce(parallel, out,
             run_record(student_model, cfg, parallel, device, corpus, teacher=args.teacher, student=student_name,
                        distill={k: getattr(args, k) for k in SETTINGS}, parameters=counts),
             f"{PREFIX} distil {args.teacher} ({counts['teacher']['total'] / 1e6:.2f}M parameters, "
             f"{counts['teacher']['activated'] / 1e6:.2f}M activated) into {student_name} "
             f"({counts['student']['total'] / 1e6:.2f}M, {counts['student']['activated'] / 1e6:.2f}M activated), "
             f"world {parallel.world_size} (dp {parallel.dp_size} x ep {parallel.ep_size}), {device}")

    result = run(distiller, sampler, parallel, cfg, tensorboard=args.tensorboard)

    if parallel.is_rank0:
        last = max(result.val_losses)
        summary = dict(teacher_val_loss=result.first_record["teacher_val_loss"],
                       student_val_loss=result.val_losses[last], val_losses=result.val_losses, parameters=counts,
                       wall_seconds=time.perf_counter() - started,
                       saved=str(result.last_checkpoint) if result.last_checkpoint else None)
        (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{PREFIX} teacher val loss {summary['teacher_val_loss']:.3f}", flush=True)
    report(parallel, result, out, PREFIX)
    finish(parallel)
    return result
