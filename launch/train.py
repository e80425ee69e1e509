"""Train a moe_ep language model, on one process or under torchrun.

    torchrun --standalone --nproc_per_node 2 launch/train.py --preset tiny --ep-size 2 --steps 300 --out runs/tiny
    python launch/train.py --preset tiny --steps 300 --out runs/tiny-1proc

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
from moe_ep.data import BatchSampler, load_corpus
from moe_ep.models import MODEL_PRESETS, ModelConfig, MoETransformerLM
from moe_ep.training import TrainConfig, latest_checkpoint, plot_run, train
from moe_ep.training.config import parse_field_overrides

_DEFAULTS = TrainConfig()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model preset (default tiny)")
    p.add_argument("--moe", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an MoEConfig field of the preset, e.g. --moe n_group=2 (repeatable)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size; must divide the world size")
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes one EP group spans (default: from LOCAL_WORLD_SIZE); set it to emulate nodes")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's max)")
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
    p.add_argument("--resume", nargs="?", const="latest", default="auto", metavar="auto|latest|none|CKPT_DIR",
                   help="auto (default): continue from OUT/ckpt's latest complete checkpoint if there is one, "
                        "else start fresh; latest (bare --resume): the same but fail without one; none: start "
                        "fresh; CKPT_DIR: continue from that checkpoint (written at any layout)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="initialisation and data order")
    p.add_argument("--out", default=_DEFAULTS.out_dir, help="output folder (metrics, plots, checkpoints)")
    return p.parse_args(argv)


def setup_parallel(ep_size: int, nodes) -> tuple[moe_ep.ParallelState, torch.device]:
    """The parallel state and this rank's device (torchrun) or a single process."""
    if "RANK" not in os.environ:
        if ep_size != 1:
            raise SystemExit(f"--ep-size {ep_size} needs several processes: start with torchrun")
        return moe_ep.ParallelState(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return moe_ep.init_expert_parallel(ep_size=ep_size, nodes=nodes), device


def resume_point(resume: str, out: Path):
    """The checkpoint folder ``--resume`` names, or None to start fresh."""
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        found = latest_checkpoint(out)
        if found is None and resume == "latest":
            raise SystemExit(f"--resume: no complete checkpoint under {out / 'ckpt'}")
        return found
    return Path(resume)


def main(argv=None) -> None:
    args = parse_args(argv)
    parallel, device = setup_parallel(args.ep_size, args.nodes)
    rank = dist.get_rank() if parallel.distributed else 0
    base = ModelConfig.preset(args.preset)
    model_cfg = base.replace(moe=base.moe.replace(**parse_field_overrides(args.moe)))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len or model_cfg.max_seq_len,
                      lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, log_every=args.log_every,
                      val_every=args.val_every, ckpt_every=args.ckpt_every, val_batches=args.val_batches,
                      seed=args.seed, out_dir=args.out)
    resume = resume_point(args.resume, Path(args.out))

    torch.manual_seed(cfg.seed + rank)  # training-time noise (router jitter); weights have their own seeds
    corpus = load_corpus(args.data, max_bytes=args.max_data_bytes)
    sampler = BatchSampler(corpus, cfg.batch_size, cfg.seq_len, cfg.seed, rank, parallel.world_size)
    model = MoETransformerLM(model_cfg, parallel, seed=cfg.seed).to(device)
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        run_info = dict(model=model_cfg.to_dict(), train=cfg.to_dict(), world_size=parallel.world_size,
                        ep_size=parallel.ep_size, dp_size=parallel.dp_size, device=str(device),
                        data=dict(source=corpus.source, train_tokens=corpus.train.numel(),
                                  val_tokens=corpus.val.numel(), fingerprint=corpus.fingerprint),
                        resumed_from=str(resume) if resume else None)
        if resume:
            print(f"[moe_ep] resuming from {resume}", flush=True)
        (Path(args.out) / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[moe_ep] {args.preset}: {n_params / 1e6:.2f}M parameters on rank 0, world {parallel.world_size} "
              f"(dp {parallel.dp_size} x ep {parallel.ep_size}), {device}, "
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
    if parallel.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
