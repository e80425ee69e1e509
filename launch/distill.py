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
from pathlib import Path

from moe_ep.distill.adapters import MODEL_DTYPES
from moe_ep.distill.checkpoints import checkpoint_at
from moe_ep.distill.losses import DISTILL_METHODS, DistillationLoss
from moe_ep.distill.run import distill_run
from moe_ep.models import MODEL_PRESETS
from moe_ep.training.cli import (LOOP_FLAGS, add_layout_arguments, add_loop_arguments, blame,
                                 check_layout_arguments, check_run_arguments, finite_float, loop_config)
from moe_ep.training.model_source import preset_config


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
    p.add_argument("--teacher-dtype", default="float32", choices=MODEL_DTYPES)
    p.add_argument("--student-dtype", default="float32", choices=MODEL_DTYPES)
    add_loop_arguments(p, out_default="runs/distill")
    return p


# DistillationLoss argument -> its flag
LOSS_FLAGS = {"temperature": "--temperature", "alpha": "--alpha", "hidden_loss_weight": "--hidden-weight",
              "attention_loss_weight": "--attention-weight", "relation_loss_weight": "--relation-weight"}


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked before any work (``moe_ep.training.cli``): one that cannot work exits with status 2."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.moe and not args.student_preset:
        p.error("argument --moe: overrides a --student-preset")
    for flag, folder in (("--teacher", args.teacher), ("--student", args.student)):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            with blame(p, flag):
                checkpoint_at(Path(folder))
    model = None
    if args.student_preset:
        with blame(p, "--moe"):
            model = preset_config(args.student_preset, args.moe)
    check_layout_arguments(p, args, model)
    with blame(p, LOSS_FLAGS):
        DistillationLoss(args.temperature, args.alpha, args.hidden_weight, args.attention_weight,
                         args.relation_weight, args.method, layers=(1, 1), hidden_sizes=(1, 1))
    with blame(p, LOOP_FLAGS):
        cfg = loop_config(args, model.max_seq_len) if model else loop_config(args)
    check_run_arguments(p, args, cfg, model)
    return args


def main(argv=None) -> None:
    distill_run(parse_args(argv))


if __name__ == "__main__":
    main()
