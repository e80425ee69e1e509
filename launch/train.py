"""Train a moe_ep language model, on one process or under torchrun.

    torchrun --standalone --nproc_per_node 2 launch/train.py --preset tiny --ep-size 2 --steps 300 --out runs/tiny
    python launch/train.py --preset tiny --steps 300 --out runs/tiny-1proc
    torchrun --standalone --nproc_per_node 2 launch/train.py --hf-model DIR --ep-size 2 --save-hf runs/hf/model
    torchrun --standalone --nproc_per_node 4 launch/train.py --preset tiny --pp-size 2 --ep-size 2 --grad-accum 4 \\
        --pp-schedule dualpipev --pp-overlap --out runs/tiny-pp2
    torchrun --standalone --nproc_per_node 2 launch/train.py --upcycle-from runs/dense --upcycle fine 4 --ep-size 2 \\
        --moe n_routed_experts=12 --moe num_experts_per_tok=3 --out runs/upcycled

Under torchrun (``RANK`` in the environment) the world is a (pp, dp, ep) mesh
from ``moe_ep.init_expert_parallel`` (NCCL with CUDA, gloo without); each
rank uses ``cuda:LOCAL_RANK`` when CUDA is present. A plain ``python`` start
is one process with ep 1. launch/README.md and docs/training.md describe
the flags, the outputs and multi-node starts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from moe_ep.training import TrainConfig
from moe_ep.training.cli import (LOOP_FLAGS, add_eplb_arguments, add_loop_arguments, add_model_arguments,
                                 add_pipeline_arguments, add_upcycle_arguments, blame, check_eplb_arguments,
                                 check_model_arguments, check_pipeline_arguments, check_run_arguments,
                                 check_upcycle_arguments, loop_config)
from moe_ep.training.model_source import default_seq_len
from moe_ep.training.runs import plain_run, resume_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_pipeline_arguments(p)
    add_upcycle_arguments(p)
    add_loop_arguments(p, out_default=TrainConfig().out_dir)
    add_eplb_arguments(p)
    p.add_argument("--resume", nargs="?", const="latest", default="auto", metavar="auto|latest|none|CKPT_DIR",
                   help="auto (default): continue from OUT/ckpt's latest complete checkpoint if there is one, "
                        "else start fresh; latest (bare --resume): the same but fail without one; none: start "
                        "fresh; CKPT_DIR: continue from that checkpoint, or a run folder's latest (written at any "
                        "layout)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked before any work (``moe_ep.training.cli``): one that cannot work exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    model = check_upcycle_arguments(parser, args)
    if model is None:
        model = check_model_arguments(parser, args)
    with blame(parser, LOOP_FLAGS):
        cfg = loop_config(args, default_seq_len(args))
    check_run_arguments(parser, args, cfg, model)
    check_pipeline_arguments(parser, args, cfg, model)
    check_eplb_arguments(parser, args, model)
    with blame(parser, "--resume"):
        resume_point(args.resume, Path(args.out))
    return args


def main(argv=None) -> None:
    plain_run(parse_args(argv))


if __name__ == "__main__":
    main()
