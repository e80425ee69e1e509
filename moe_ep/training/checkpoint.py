"""Per-rank checkpoints that resume exactly at the same layout.

Layout on disk::

    OUT/ckpt/step_0100/rank_0.pt     one file per rank (torch.save)
    OUT/ckpt/step_0100/rank_1.pt
    OUT/ckpt/step_0100/complete.json written by rank 0 once every rank has saved

A rank file holds the rank's model state dict (its expert shard and the
replicated weights, MoE buffers such as the V3 bias included), the AdamW
state, the step, the torch RNG states, the data position
(``BatchSampler.state_dict``), the layout (world, ep, dp, rank) and the
model and training configs. Files are written to a temporary name and
renamed, so a checkpoint without ``complete.json`` is ignored.

Resuming requires the same layout, model config, data and trajectory fields
of ``TrainConfig`` (``TRAJECTORY_FIELDS``); then the resumed run's
parameters equal bitwise those of a run that never stopped.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..data import BatchSampler
from ..parallel.state import ParallelState
from .config import TRAJECTORY_FIELDS, TrainConfig

_STEP_DIR = re.compile(r"step_(\d+)$")
_COMPLETE = "complete.json"


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "ckpt" / f"step_{step:04d}"


def _layout(parallel: ParallelState) -> dict:
    rank = dist.get_rank() if parallel.distributed else 0
    return dict(world_size=parallel.world_size, ep_size=parallel.ep_size, dp_size=parallel.dp_size, rank=rank)


def _rng_state() -> dict:
    state = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    sampler: BatchSampler, parallel: ParallelState, cfg: TrainConfig) -> Path:
    """Write this rank's file of ``step`` (collective: every rank calls it); return the folder."""
    folder = step_dir(out_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    layout = _layout(parallel)
    state = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(), rng=_rng_state(),
                 data=sampler.state_dict(step), layout=layout, model_config=model.config.to_dict(),
                 train_config=cfg.to_dict())
    target = folder / f"rank_{layout['rank']}.pt"
    tmp = target.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, target)
    if parallel.distributed:
        dist.barrier(group=parallel.world_group)
    if layout["rank"] == 0:
        marker = {k: v for k, v in layout.items() if k != "rank"}
        (folder / _COMPLETE).write_text(json.dumps(dict(step=step, **marker)) + "\n")
    return folder


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The complete checkpoint folder with the highest step under ``out_dir/ckpt``, or None."""
    root = Path(out_dir) / "ckpt"
    found = [(int(m.group(1)), p) for p in root.glob("step_*")
             if (m := _STEP_DIR.search(p.name)) and (p / _COMPLETE).exists()] if root.is_dir() else []
    return max(found)[1] if found else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: BatchSampler,
                    parallel: ParallelState, cfg: TrainConfig) -> int:
    """Restore this rank's state from ``folder``; return the step to continue from.

    Raises ``ValueError`` when the checkpoint is incomplete or belongs to a
    different layout, model, data or trajectory.
    """
    folder = Path(folder)
    if not (folder / _COMPLETE).exists():
        raise ValueError(f"load_checkpoint: {folder} is not a complete checkpoint (no {_COMPLETE})")
    layout = _layout(parallel)
    saved = json.loads((folder / _COMPLETE).read_text())
    if any(saved[k] != layout[k] for k in ("world_size", "ep_size", "dp_size")):
        raise ValueError(f"load_checkpoint: {folder} was saved by world {saved['world_size']} "
                         f"(ep {saved['ep_size']}), this run is world {layout['world_size']} (ep {layout['ep_size']}); "
                         f"resume with the same number of processes and --ep-size")
    state = torch.load(folder / f"rank_{layout['rank']}.pt", map_location="cpu", weights_only=True)
    if state["layout"] != layout:
        raise ValueError(f"load_checkpoint: rank file saved at layout {state['layout']}, this rank is {layout}")
    if state["model_config"] != model.config.to_dict():
        raise ValueError("load_checkpoint: the checkpoint's model config differs from this run's")
    changed = {k: (state["train_config"][k], getattr(cfg, k)) for k in TRAJECTORY_FIELDS
               if state["train_config"][k] != getattr(cfg, k)}
    if changed:
        raise ValueError(f"load_checkpoint: training settings differ from the checkpoint's (saved, now): {changed}")
    step = sampler.check_resume(state["data"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return step
