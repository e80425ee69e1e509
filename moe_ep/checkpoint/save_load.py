"""Write and read checkpoint folders: the training state for resuming, or model weights alone.

``save_checkpoint`` (collective; every rank calls it) writes
``OUT/ckpt/step_XXXX``: the model (single-process keys, global expert ids),
the optimizer state (expert moments sharded like the experts), every rank's
RNG state (DCP, ``tensors.py`` has the keys) and then ``manifest.json``
(``manifest.py``). ``load_checkpoint`` restores them at any layout: another
world size, EP size or data-parallel size, one process included.

What a resume at another layout restores, and what it checks:

* weights, buffers (V3 bias, drop step) and AdamW state: bitwise, each rank
  reading its own rows of the expert stacks;
* the step and the data position: the global batch of step ``s`` depends
  only on (seed, s, global batch size), so ``--batch-size`` must be scaled so
  that ``batch_size * world_size`` equals the checkpoint's (checked);
* the model config and the trajectory fields of ``TrainConfig``
  (``TRAJECTORY_FIELDS``) must equal the checkpoint's;
* RNG: at the same world size every rank gets back its own generator state,
  so a resumed run draws the same numbers as one that never stopped. At
  another world size there is no such correspondence (the only training-time
  draw is the router jitter, drawn per rank for the rank's tokens), so every
  rank seeds its generator from (seed, step, rank) instead: with
  ``router_jitter = 0``, as in every model preset, no draw happens in training
  and the resumed losses match the uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..data import BatchSampler
from ..parallel.state import ParallelState
from .manifest import MANIFEST, CheckpointError, read_manifest, step_dir, verify_files, write_manifest
from .storage import load_tensors, read_metadata, save_tensors
from .tensors import MODEL, OPTIM, FlatState, restore_rng, rng_tensors

if TYPE_CHECKING:
    from ..models import MoETransformerLM
    from ..training.config import TrainConfig

# The TrainConfig fields that shape the parameters a run produces: a resumed run must use the checkpoint's
# values. The per-rank batch_size is not among them: the global batch is checked with the data position.
TRAJECTORY_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seq_len",
                     "seed")


def _rank(parallel: ParallelState) -> int:
    return dist.get_rank() if parallel.distributed else 0


def _barrier(parallel: ParallelState) -> None:
    if parallel.distributed:
        dist.barrier(group=parallel.world_group)


def _group(parallel: ParallelState) -> Optional[dist.ProcessGroup]:
    return parallel.world_group if parallel.distributed else None


def layout_of(parallel: ParallelState) -> dict:
    return dict(world_size=parallel.world_size, ep_size=parallel.ep_size, dp_size=parallel.dp_size)


def write_checkpoint(folder: Path, model: nn.Module, parallel: ParallelState, fields: dict,
                     optimizer: Optional[torch.optim.Optimizer] = None, rng: bool = False) -> Path:
    """Write ``model`` (and ``optimizer`` state, RNG states) into ``folder``, manifest last (collective).

    ``fields``: the manifest's ``step``, ``train_config`` and ``data``. An
    existing folder of the same name is replaced (its manifest removed first,
    so it is never seen complete with mixed contents).
    """
    folder = Path(folder)
    rank = _rank(parallel)
    flat = FlatState(model, parallel)
    tensors = flat.model_tensors()
    contents = ["model"]
    if optimizer is not None:  # an optimizer that has not stepped yet has no state: saved as such
        tensors.update(flat.optimizer_tensors(optimizer))
        contents.append("optimizer")
    if rng:
        tensors.update(rng_tensors(rank))
        contents.append("rng")
    if rank == 0:
        if folder.exists():
            (folder / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    _barrier(parallel)
    save_tensors(tensors, folder, _group(parallel))
    _barrier(parallel)  # every rank's files are on disk before the manifest marks the folder complete
    if rank == 0:
        write_manifest(folder, dict(fields, contents=contents, layout=layout_of(parallel),
                                    model_config=model.config.to_dict()))
    _barrier(parallel)
    return folder


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    sampler: BatchSampler, parallel: ParallelState, cfg: TrainConfig) -> Path:
    """The training state after ``step`` updates into ``OUT/ckpt/step_XXXX`` (collective); returns the folder."""
    fields = dict(step=step, train_config=cfg.to_dict(), data=sampler.state_dict(step))
    return write_checkpoint(step_dir(out_dir, step), model, parallel, fields, optimizer, rng=True)


def _as_json(value):
    return json.loads(json.dumps(value))


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


def open_checkpoint(folder: Path) -> dict:
    """The manifest of ``folder`` after checking every file's size and checksum against it."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    return manifest


def _model_targets(flat: FlatState, saved_keys: set, folder: Path) -> dict:
    targets = flat.model_tensors()
    unexpected = sorted(k for k in saved_keys if k.startswith(MODEL) and k not in targets)
    if unexpected:
        raise CheckpointError(f"{folder}: entries {unexpected[:5]} match no tensor of this model")
    return targets


def load_weights(folder: Path, model: nn.Module, parallel: ParallelState) -> dict:
    """Load the model weights and buffers of ``folder`` (written at any layout) into ``model``; returns the manifest.

    Collective over ``parallel``'s world. Every tensor of ``model`` must be in
    the checkpoint with the same global shape and dtype, and the checkpoint
    may hold no other model tensor; config fields that shape no tensor (eval
    capacity, routing coefficients...) may differ from the manifest's.
    """
    manifest = open_checkpoint(folder)
    flat = FlatState(model, parallel)
    saved = read_metadata(folder).state_dict_metadata
    load_tensors(_model_targets(flat, set(saved), Path(folder)), Path(folder), _group(parallel))
    return manifest


def load_model(folder: Path, parallel: Optional[ParallelState] = None, **moe_overrides) -> "MoETransformerLM":
    """The model of checkpoint ``folder`` with its weights (any saved layout), built at ``parallel``'s layout.

    ``parallel`` None: one process. ``moe_overrides`` replace ``MoEConfig``
    fields of the saved config that shape no tensor (e.g.
    ``eval_capacity_factor=None``). Collective over ``parallel``'s world.
    """
    from ..models import ModelConfig, MoETransformerLM

    parallel = parallel or ParallelState()
    config = ModelConfig.from_dict(read_manifest(folder)["model_config"])
    if moe_overrides:
        config = config.replace(moe=config.moe.replace(**moe_overrides))
    model = MoETransformerLM(config, parallel)
    load_weights(folder, model, parallel)
    return model


def _reseed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.blake2b(f"rng/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


@dataclass
class RestoredState:
    """What ``restore_training_state`` read besides the weights: the step and the optimizer state to install."""

    step: int
    optimizer_state: dict
    flat: FlatState

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Install the saved state into ``optimizer`` (over the model's own parameters, any param groups)."""
        self.flat.load_optimizer_state(optimizer, self.optimizer_state)


def restore_training_state(folder: Path, model: nn.Module, sampler: BatchSampler, parallel: ParallelState,
                           cfg: TrainConfig) -> RestoredState:
    """Load weights, buffers and RNG of ``folder`` (written at any layout) into this run; read its optimizer state.

    Raises ``CheckpointError`` (a ``ValueError``) naming the file or field
    when the checkpoint is incomplete, damaged, holds no optimizer state, or
    belongs to another model, data or trajectory (see the module docstring).
    """
    folder = Path(folder)
    manifest = open_checkpoint(folder)
    diff = _differences(manifest["model_config"], _as_json(model.config.to_dict()))
    if diff:
        raise CheckpointError(f"{folder / MANIFEST}: the model config differs from this run's: " + "; ".join(diff))
    if "optimizer" not in manifest["contents"] or manifest.get("train_config") is None:
        raise CheckpointError(f"{folder}: holds {manifest['contents']} without a training state (converted "
                              f"weights?); it can initialise a model but not resume training")
    changed = [f"{k}: checkpoint {manifest['train_config'][k]!r}, this run {getattr(cfg, k)!r}"
               for k in TRAJECTORY_FIELDS if manifest["train_config"][k] != _as_json(getattr(cfg, k))]
    if changed:
        raise CheckpointError(f"{folder / MANIFEST}: training settings differ: " + "; ".join(changed))
    try:
        step = sampler.check_resume(manifest["data"])
    except ValueError as exc:
        raise CheckpointError(f"{folder / MANIFEST}: {exc}") from exc

    rank = _rank(parallel)
    flat = FlatState(model, parallel)
    saved = read_metadata(folder).state_dict_metadata
    targets = _model_targets(flat, set(saved), folder)
    optim_targets, optim_state = flat.optimizer_targets({k: m for k, m in saved.items() if k.startswith(OPTIM)})
    same_world = manifest["layout"]["world_size"] == parallel.world_size
    rng = {k: torch.empty_like(v) for k, v in rng_tensors(rank).items()
           if k in saved} if same_world and "rng" in manifest["contents"] else {}
    load_tensors({**targets, **optim_targets, **rng}, folder, _group(parallel))
    if rng:
        restore_rng(rng, rank)
    else:
        torch.manual_seed(_reseed(cfg.seed, step, rank))
    return RestoredState(step, optim_state, flat)


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: BatchSampler,
                    parallel: ParallelState, cfg: TrainConfig) -> int:
    """Restore the training state of ``folder`` (written at any layout); return the step to continue from.

    ``restore_training_state`` then the optimizer state into ``optimizer``.
    """
    restored = restore_training_state(folder, model, sampler, parallel, cfg)
    restored.load_optimizer(optimizer)
    return restored.step
