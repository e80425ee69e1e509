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
from torch import nn

from ..checkpoint import find_checkpoint
from ..checkpoint.manifest import MANIFEST
from ..data import BatchSampler
from ..hf_model import save_pretrained
from ..models import MoETransformerLM
from ..parallel.state import ParallelState
from ..training.checkpoints import load_model, save_checkpoint
from ..training.config import TrainConfig


def checkpoint_at(path: Path) -> Path:
    """The checkpoint at or under ``path`` (``find_checkpoint``); ``ValueError`` when there is none."""
    folder = find_checkpoint(path)
    if folder is None:
        raise ValueError(f"distill: {path} is neither a transformers model folder (config.json), a complete "
                         f"checkpoint ({MANIFEST}) nor a run folder with one under ckpt/")
    return folder


def load_lm_checkpoint(path: Path, parallel: ParallelState, no_eval_dropping: bool = False) -> MoETransformerLM:
    """The model of the checkpoint at or under ``path`` (``checkpoint_at``), built at ``parallel``'s layout.

    no_eval_dropping: set every MoE layer's ``eval_capacity_factor`` to None
    (a teacher in eval mode then drops no token). Collective; any saved layout.
    """
    overrides = dict(eval_capacity_factor=None) if no_eval_dropping else {}
    return load_model(checkpoint_at(path), parallel, **overrides)


def save_lm(model: nn.Module, out_dir: Path, step: int, optimizer: torch.optim.Optimizer,
            sampler: Optional[BatchSampler], parallel: ParallelState, cfg: TrainConfig,
            tokenizer: Optional[Any] = None) -> Path:
    """Write a student (collective); return where it went.

    Our model: ``save_checkpoint`` under ``out_dir/ckpt/step_XXXX``. A
    transformers model (``model.hf``): ``moe_ep.hf_model.save_pretrained``
    into ``out_dir``, with the tokenizer when one is given.
    """
    if isinstance(model, MoETransformerLM):
        return save_checkpoint(out_dir, step, model, optimizer, sampler, parallel, cfg)
    return save_pretrained(model.hf, out_dir, tokenizer=tokenizer)
