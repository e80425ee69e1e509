"""Reading teachers and writing students in moe_ep's checkpoint format: the one place that knows it.

The format is ``moe_ep.checkpoint``'s (``OUT/ckpt/step_XXXX``: sharded
``torch.distributed.checkpoint`` files and ``manifest.json``). A teacher saved
at any layout is read at this process's layout with ``load_model`` (each
rank reads its own expert rows). A student is saved with
``save_checkpoint`` in the dtype it was trained in, so ``launch/train.py
--resume`` can continue it and ``load_lm_checkpoint`` reads it back: loading
casts floating-point tensors to the model's dtype (a bf16 student resumes in
fp32; a teacher is built in fp32, then cast to ``--teacher-dtype``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..data import BatchSampler
from ..models import MoETransformerLM
from ..parallel.state import ParallelState
from ..checkpoint import latest_checkpoint, load_model, save_checkpoint
from ..checkpoint.manifest import MANIFEST
from ..training.config import TrainConfig


def checkpoint_folder(path: Path) -> Path:
    """``path`` itself when it is a complete checkpoint, else the latest complete one under ``path/ckpt``."""
    if (path / MANIFEST).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ValueError(f"distill: {path} is neither a transformers model folder (config.json), a complete "
                         f"checkpoint ({MANIFEST}) nor a run folder with one under ckpt/")
    return found


def load_lm_checkpoint(path: Path, parallel: ParallelState, no_eval_dropping: bool = False) -> MoETransformerLM:
    """The checkpointed model, built at ``parallel``'s layout (see the module docstring).

    no_eval_dropping: set every MoE layer's ``eval_capacity_factor`` to None
    (a teacher in eval mode then drops no token).
    """
    overrides = dict(eval_capacity_factor=None) if no_eval_dropping else {}
    return load_model(checkpoint_folder(path), parallel, **overrides)  # collective; any saved layout


def save_lm(model: nn.Module, out_dir: Path, step: int, optimizer: torch.optim.Optimizer,
            sampler: Optional[BatchSampler], parallel: ParallelState, cfg: TrainConfig,
            tokenizer: Optional[Any] = None) -> Path:
    """Write a student (collective); return where it went.

    Our model: ``save_checkpoint`` under ``out_dir/ckpt/step_XXXX``. A
    transformers model (``model.hf``): rank 0 calls ``save_pretrained(out_dir)``,
    and the tokenizer's when one is given.
    """
    if isinstance(model, MoETransformerLM):
        return save_checkpoint(out_dir, step, model, optimizer, sampler, parallel, cfg)
    if not parallel.distributed or dist.get_rank() == 0:
        model.hf.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    if parallel.distributed:
        dist.barrier(group=parallel.world_group)
    return Path(out_dir)
