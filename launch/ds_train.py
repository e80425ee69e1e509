"""Train the moe_ep language model through a DeepSpeed engine (the same model, data and metrics as launch/train.py).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/ds_train.py --deepspeed_config launch/ds_config.json \\
        --steps 300 --out runs/ds-tiny [--ep-size 2]

(``python -m torch.distributed.run --nproc_per_node 2 launch/ds_train.py ...`` works too.) The model is
built on DeepSpeed's expert groups (``moe_ep.integrations.deepspeed``), its MoE layers are wrapped as
``deepspeed.moe.layer.MoE`` and every optimizer step is ``engine.backward`` / ``engine.step`` followed by
the MoE bias update (or, for a step the fp16 loss scaler skipped, the MoE step discarded). From the
DeepSpeed config come the micro batch per rank (``train_micro_batch_size_per_gpu``), the micro-batches per
optimizer step (``gradient_accumulation_steps``), the precision (``bf16`` / ``fp16`` sections:
launch/ds_config_bf16.json, launch/ds_config_fp16.json), the peak learning rate, betas, eps and weight decay
(AdamW params), the gradient clipping and the ZeRO stage (0, 1 or 2); the warmup + cosine schedule of the
plain loop is applied by this script each step. ``--activation-checkpointing`` checkpoints every transformer
block. Outputs in ``--out``: ``run.json``, ``metrics.jsonl`` (the fields of ``moe_ep/training/metrics.py``),
``loss.png``, ``expert_load.png`` and, with ``--ckpt-every``, DeepSpeed checkpoints under ``ds_ckpt/``
(``--resume`` continues from the latest). ``--init-from CKPT`` continues from a moe_ep checkpoint of
launch/train.py written at any layout. docs/deepspeed.md has the details.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
    # The deepspeed launcher (unlike torchrun) leaves threads unset: share the cores between the local ranks,
    # or the ranks oversubscribe the CPU and gloo collectives crawl.
    local_procs = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import deepspeed  # noqa: E402

from moe_ep.training.cli import (LOOP_FLAGS, add_model_arguments, add_run_arguments,  # noqa: E402
                                 add_schedule_arguments, blame, check_checkpoint_folder, check_model_arguments,
                                 check_run_arguments)
from moe_ep.training.deepspeed import (CKPT_DIR, config_fields, deepspeed_precision, deepspeed_run,  # noqa: E402
                                       grad_clip_plan, read_ds_config, train_config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    add_model_arguments(p)
    add_schedule_arguments(p)
    add_run_arguments(p, out_default="runs/ds-train",
                      ckpt_help="steps between DeepSpeed checkpoints (OUT/ds_ckpt); 0: none (default)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/ds_ckpt")
    p.add_argument("--init-from", default=None, metavar="CKPT_DIR",
                   help="continue from a moe_ep checkpoint (launch/train.py's, any layout): weights, V3 bias, step "
                        "and data position; AdamW moments too when DeepSpeed runs torch's AdamW on the model's "
                        "parameters (ZeRO stage 0), else they restart from zero")
    p.add_argument("--pp-size", type=int, default=1, help="pipeline parallelism is launch/train.py's; only 1 here")
    return deepspeed.add_config_arguments(p)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags and the DeepSpeed config, checked before any work (``moe_ep.training.cli``): one that cannot work
    exits with status 2."""
    p = build_parser()
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("argument --deepspeed_config: is required (e.g. launch/ds_config.json)")
    if args.resume and args.init_from:
        p.error("argument --init-from: excludes --resume (--resume continues DeepSpeed's checkpoints, --init-from "
                "a moe_ep checkpoint)")
    if args.pp_size != 1:
        p.error("argument --pp-size: pipeline parallelism runs under launch/train.py (torch.distributed.pipelining), "
                "not DeepSpeed's engine; see docs/pipeline.md and docs/deepspeed.md")
    model = check_model_arguments(p, args)
    with blame(p, "--deepspeed_config"):
        ds_config = read_ds_config(args.deepspeed_config)
        grad_clip_plan(ds_config)
        deepspeed_precision(ds_config)
        ds_fields = config_fields(ds_config, args.deepspeed_config)
    with blame(p, {**LOOP_FLAGS, **dict.fromkeys(ds_fields, "--deepspeed_config")}):
        cfg = train_config(args, ds_fields)
    check_run_arguments(p, args, cfg, model)
    if args.resume and not (Path(args.out) / CKPT_DIR / "latest").is_file():
        p.error(f"argument --resume: no DeepSpeed checkpoint under {Path(args.out) / CKPT_DIR} (no 'latest' file)")
    if args.init_from:
        if args.hf_model:
            p.error("argument --init-from: takes a moe_ep checkpoint of a preset model; it does not apply to "
                    "--hf-model")
        check_checkpoint_folder(p, "--init-from", args.init_from)
    return args


def main(argv=None) -> None:
    deepspeed_run(parse_args(argv))


if __name__ == "__main__":
    main()
