"""Train a moe_ep language model, on one process or under torchrun.

    torchrun --standalone --nproc_per_node 2 launch/train.py --preset tiny --ep-size 2 --steps 300 --out runs/tiny
    python launch/train.py --preset tiny --steps 300 --out runs/tiny-1proc
    torchrun --standalone --nproc_per_node 2 launch/train.py --hf-model DIR --ep-size 2 --save-hf runs/hf/model

Under torchrun (``RANK`` in the environment) the world is a (dp, ep) mesh
from ``moe_ep.init_expert_parallel`` (NCCL with CUDA, gloo without); each
rank uses ``cuda:LOCAL_RANK`` when CUDA is present. A plain ``python`` start
is one process with ep 1. launch/README.md and docs/training.md describe
the flags, the outputs and multi-node starts.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import moe_ep
from moe_ep.data import BatchSampler
from moe_ep.checkpoint import read_manifest
from moe_ep.training import TrainConfig, latest_checkpoint, plot_run, train
from moe_ep.training.cli import (LOOP_FLAGS, add_loop_arguments, add_model_arguments, blame, check_model_arguments,
                                 check_run_arguments, loop_config)
from moe_ep.training.model_source import build_model, default_seq_len, run_record, save_hf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_loop_arguments(p, out_default=TrainConfig().out_dir)
    p.add_argument("--resume", nargs="?", const="latest", default="auto", metavar="auto|latest|none|CKPT_DIR",
                   help="auto (default): continue from OUT/ckpt's latest complete checkpoint if there is one, "
                        "else start fresh; latest (bare --resume): the same but fail without one; none: start "
                        "fresh; CKPT_DIR: continue from that checkpoint (written at any layout)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked before any work (``moe_ep.training.cli``): one that cannot work exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    model = check_model_arguments(parser, args)
    with blame(parser, LOOP_FLAGS):
        cfg = loop_config(args, default_seq_len(args))
    check_run_arguments(parser, args, cfg, model)
    with blame(parser, "--resume"):
        resume_point(args.resume, Path(args.out))
    return args


def setup_parallel(ep_size: int, nodes) -> tuple[moe_ep.ParallelState, torch.device]:
    """The parallel state and this rank's device (torchrun) or a single process.

    ``ep_size`` and ``nodes`` as checked by ``moe_ep.training.cli.check_layout_arguments`` (1 without torchrun).
    """
    if "RANK" not in os.environ:
        return moe_ep.ParallelState(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return moe_ep.init_expert_parallel(ep_size=ep_size, nodes=nodes), device


def resume_point(resume: str, out: Path):
    """The checkpoint folder ``--resume`` names, or None to start fresh; ``ValueError`` if it names none."""
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        found = latest_checkpoint(out)
        if found is None and resume == "latest":
            raise ValueError(f"no complete checkpoint under {out / 'ckpt'}")
        return found
    read_manifest(Path(resume))  # a complete checkpoint, else CheckpointError naming the file
    return Path(resume)


def main(argv=None) -> None:
    args = parse_args(argv)
    parallel, device = setup_parallel(args.ep_size, args.nodes)
    rank = dist.get_rank() if parallel.distributed else 0
    cfg = loop_config(args, default_seq_len=default_seq_len(args))
    resume = resume_point(args.resume, Path(args.out))

    torch.manual_seed(cfg.seed + rank)  # training-time noise (router jitter); weights have their own seeds
    source = build_model(args, parallel, device, seed=cfg.seed)
    model, corpus = source.model, source.corpus
    sampler = BatchSampler(corpus, cfg.batch_size, cfg.seq_len, cfg.seed, rank, parallel.world_size)
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        run_info = run_record(source.info, cfg, parallel, device, corpus,
                              resumed_from=str(resume) if resume else None)
        if resume:
            print(f"[moe_ep] resuming from {resume}", flush=True)
        (Path(args.out) / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[moe_ep] {args.hf_model or args.preset}: {n_params / 1e6:.2f}M parameters on rank 0, "
              f"world {parallel.world_size} (dp {parallel.dp_size} x ep {parallel.ep_size}), {device}, "
              f"{corpus.train.numel() / 1e6:.1f}M train / {corpus.val.numel() / 1e6:.2f}M val tokens", flush=True)

    result = train(model, sampler, parallel, cfg, resume_from=resume)

    if rank == 0:
        plots = plot_run(Path(args.out))
        first, final = result.val_losses[min(result.val_losses)], result.val_losses[max(result.val_losses)]
        print(f"[moe_ep] val loss {first:.3f} (step {min(result.val_losses)}) -> {final:.3f} "
              f"(step {max(result.val_losses)})", flush=True)
        print(f"[moe_ep] metrics: {Path(args.out) / 'metrics.jsonl'}", flush=True)
        for path in plots:
            print(f"[moe_ep] plot: {path}", flush=True)
        if result.last_checkpoint is not None:
            print(f"[moe_ep] checkpoint: {result.last_checkpoint}", flush=True)
    if args.save_hf:
        save_hf(source, args.save_hf)
        if rank == 0:
            print(f"[moe_ep] transformers model: {args.save_hf}", flush=True)
    if parallel.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
