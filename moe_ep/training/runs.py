"""What a launcher runs after parsing its flags: the layout, the model, the trainer, the driver, the report.

``plain_run(args)`` is launch/train.py, ``deepspeed_run(args)`` launch/ds_train.py (distillation's is
``moe_ep.distill.run.distill_run``). Each, on every rank: the parallel state and device, the model and corpus
(``model_source.build_model``), the sampler, ``run.json`` and a one-line summary on rank 0, the trainer,
``driver.run``, the closing report (validation loss first -> last, where the metrics and plots are), then
``--save-hf`` and the end of the process group. The shared pieces are the functions below.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, find_checkpoint
from ..data import BatchSampler, Corpus, load_corpus
from ..hf_model import load_causal_lm
from ..parallel.state import ParallelState, init_expert_parallel
from .config import TrainConfig, parse_field_overrides
from .driver import RunResult, run
from .model_source import (ModelSource, build_model, default_seq_len, hf_corpus, preset_config, run_record, save_hf,
                           upcycled_model)
from .cli import loop_config
from .pipeline import PipelineTrainer
from .plain import PlainTrainer


def setup_parallel(ep_size: int, nodes: Optional[int], pp_size: int = 1) -> tuple[ParallelState, torch.device]:
    """The parallel state and this rank's device under torchrun (``RANK`` set), else one process."""
    if "RANK" not in os.environ:
        return ParallelState(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return init_expert_parallel(ep_size=ep_size, nodes=nodes, pp_size=pp_size), rank_device()


def rank_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (made current) when CUDA is present, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def resume_point(resume: str, out: Path) -> Optional[Path]:
    """The checkpoint ``--resume`` names, or None to start fresh; ``ValueError`` when it names none.

    ``none``: start fresh; ``auto``: the latest complete checkpoint under ``OUT/ckpt`` if any; ``latest``: the
    same, required; a folder: a checkpoint, or a run folder's latest (``moe_ep.checkpoint.find_checkpoint``).
    """
    if resume == "none":
        return None
    found = find_checkpoint(out if resume in ("auto", "latest") else Path(resume))
    if found is None and resume != "auto":
        where = out / "ckpt" if resume == "latest" else Path(resume)
        raise CheckpointError(f"no complete checkpoint at or under {where}")
    return found


def announce(parallel: ParallelState, out: Path, run_info: dict, summary: str) -> None:
    """Rank 0: create ``out``, write ``run.json``, print ``summary``."""
    if parallel.is_rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        print(summary, flush=True)


def report(parallel: ParallelState, result: RunResult, out: Path, prefix: str) -> None:
    """Rank 0: the validation loss first -> last, and where the metrics, plots and last checkpoint are."""
    if not parallel.is_rank0:
        return
    first, last = min(result.val_losses), max(result.val_losses)
    print(f"{prefix} val loss {result.val_losses[first]:.3f} (step {first}) -> {result.val_losses[last]:.3f} "
          f"(step {last})", flush=True)
    print(f"{prefix} metrics: {out / 'metrics.jsonl'}", flush=True)
    for path in sorted(out.glob("*.png")):
        print(f"{prefix} plot: {path}", flush=True)
    if result.last_checkpoint is not None:
        print(f"{prefix} checkpoint: {result.last_checkpoint}", flush=True)


def finish(parallel: ParallelState, source: Optional[ModelSource] = None, save_hf_dir: Optional[str] = None,
           prefix: str = "") -> None:
    """``--save-hf`` of ``source`` when asked (collective), then the end of the process group."""
    if save_hf_dir:
        save_hf(source, save_hf_dir)
        if parallel.is_rank0:
            print(f"{prefix} transformers model: {save_hf_dir}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def describe(name: str, model: torch.nn.Module, parallel: ParallelState, device: torch.device,
             corpus: Corpus, extra: str = "") -> str:
    """The one-line summary of a run: parameters on this rank, layout, device, corpus."""
    n_params = sum(p.numel() for p in model.parameters())
    pp = f"pp {parallel.pp_size} x " if parallel.pp_size > 1 else ""
    world = parallel.world_size * parallel.pp_size
    return (f"{name}: {n_params / 1e6:.2f}M parameters on rank 0, world {world} ({pp}dp {parallel.dp_size} "
            f"x ep {parallel.ep_size}){extra}, {device}, {corpus.train.numel() / 1e6:.1f}M train / "
            f"{corpus.val.numel() / 1e6:.2f}M val tokens")


def sampler_for(corpus: Corpus, cfg: TrainConfig, parallel: ParallelState) -> BatchSampler:
    """This rank's batches: shard ``data_rank`` of the stage's ``world_size`` (every pipeline stage, the same)."""
    return BatchSampler(corpus, cfg.batch_size, cfg.seq_len, cfg.seed, parallel.data_rank, parallel.world_size)


def seed_training_noise(cfg: TrainConfig, parallel: ParallelState) -> None:
    """Each data shard's generator for training-time noise (router jitter); weights have their own seeds."""
    torch.manual_seed(cfg.seed + parallel.data_rank)


def pipeline_trainer(args: argparse.Namespace, parallel: ParallelState, device: torch.device,
                     cfg: TrainConfig) -> tuple[PipelineTrainer, ModelSource]:
    """``--pp-size`` > 1: the ``PipelineTrainer`` of the preset's model, of ``--upcycle-from``'s (built whole on
    the CPU first and handed over) or of ``--hf-model``'s (loaded whole on the CPU, then pruned to this rank's
    stages), and the source whose model is this rank's part."""
    stages = dict(schedule=args.pp_schedule, layer_counts=args.pp_layers, overlap_fb=args.pp_overlap)
    if args.hf_model:
        overrides = parse_field_overrides(args.moe)
        whole = load_causal_lm(args.hf_model, parallel, **overrides)
        corpus, tokenizer = hf_corpus(args.hf_model, whole.config.vocab_size, args.data, args.max_data_bytes)
        info = dict(hf_model=args.hf_model, config=whole.config.to_dict(), moe_overrides=overrides)
        trainer = PipelineTrainer(whole, parallel, cfg, device, **stages)
        return trainer, ModelSource(trainer.model, corpus, tokenizer, info)
    if args.upcycle_from:
        whole = upcycled_model(args, parallel, cfg.seed)
        config, initial = whole.config, whole.state_dict()
    else:
        config, initial = preset_config(args.preset, args.moe, args.mtp_depth), None
    trainer = PipelineTrainer(config, parallel, cfg, device, cfg.seed, initial_state=initial,
                              mtp_weight=args.mtp_weight, **stages)
    corpus = load_corpus(args.data, max_bytes=args.max_data_bytes)
    return trainer, ModelSource(trainer.model, corpus, None, config.to_dict())


def plain_run(args: argparse.Namespace) -> RunResult:
    """launch/train.py after its flags were parsed and checked (module docstring)."""
    prefix = "[moe_ep]"
    parallel, device = setup_parallel(args.ep_size, args.nodes, args.pp_size)
    cfg = loop_config(args, default_seq_len(args))
    out = Path(cfg.out_dir)
    resume = resume_point(args.resume, out)
    seed_training_noise(cfg, parallel)
    if parallel.pp_size > 1:
        trainer, source = pipeline_trainer(args, parallel, device, cfg)
    else:
        source = build_model(args, parallel, device, seed=cfg.seed)
        trainer = PlainTrainer(source.model, parallel, cfg, eplb_interval=args.eplb_interval,
                               mtp_weight=args.mtp_weight)
    sampler = sampler_for(source.corpus, cfg, parallel)
    resuming = f"{prefix} resuming from {resume}\n" if resume else ""
    announce(parallel, out, run_record(source.info, cfg, parallel, device, source.corpus,
                                       resumed_from=str(resume) if resume else None,
                                       upcycled_from=args.upcycle_from, mtp_weight=args.mtp_weight),
             resuming + describe(f"{prefix} {args.hf_model or args.upcycle_from or args.preset}", source.model,
                                 parallel, device, source.corpus))
    result = run(trainer, sampler, parallel, cfg, resume=resume, tensorboard=args.tensorboard)
    report(parallel, result, out, prefix)
    finish(parallel, source, args.save_hf, prefix)
    return result
