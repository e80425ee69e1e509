"""A training run's checkpoints: the state to resume from (any layout), and models built from a checkpoint.

``save_checkpoint`` (collective) writes ``OUT/ckpt/step_XXXX`` with
``moe_ep.checkpoint.write_checkpoint``: the model, the optimizer state, every
rank's RNG, and in the manifest the step, the ``TrainConfig`` and the data
position. ``load_checkpoint`` restores them at any layout: another world
size, EP size or data-parallel size, one process included.

What a resume at another layout restores, and what it checks:

* weights, buffers (V3 bias, drop step) and AdamW state: bitwise, each rank
  reading its own rows of the expert stacks (stored in their logical layout:
  a run with redundant experts resumes without them and the other way round,
  ``EXECUTION_FIELDS``);
* the step and the data position: the global batch of step ``s`` depends
  only on (seed, s, global batch size), so ``--batch-size`` must be scaled so
  that ``batch_size * world_size`` equals the checkpoint's (checked);
* the model config but for ``EXECUTION_FIELDS``, and the trajectory fields
  of ``TrainConfig`` (``TRAJECTORY_FIELDS``) must equal the checkpoint's;
* dtypes: floating-point tensors are cast to the model's (a student saved in
  bf16 resumes in fp32, ``load_model`` builds fp32 and the distiller casts);
* RNG: at the same world size every rank gets back its own generator state,
  so a resumed run draws the same numbers as one that never stopped. At
  another world size there is no such correspondence (the only training-time
  draw is the router jitter, drawn per rank for the rank's tokens), so every
  rank seeds its generator from (seed, step, rank) instead: with
  ``router_jitter = 0``, as in every model preset, no draw happens in training
  and the resumed losses match the uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..checkpoint.manifest import MANIFEST, CheckpointError, step_dir
from ..checkpoint.save_load import (group_of, load_model_tensors, model_targets, open_checkpoint, rank_of,
                                    write_checkpoint)
from ..checkpoint.storage import load_tensors
from ..checkpoint.tensors import OPTIM, FlatState, restore_rng, rng_tensors
from ..config import MoEConfig
from ..data import BatchSampler
from ..eplb.layout import logical_layout
from ..models import ModelConfig, MoETransformerLM
from ..parallel.state import ParallelState
from .config import TrainConfig

# The TrainConfig fields that shape the parameters a run produces: a resumed run must use the checkpoint's
# values. The per-rank batch_size is not among them: the global batch is checked with the data position.
TRAJECTORY_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seq_len",
                     "seed")
# The MoEConfig fields of where and how experts are computed, which shape no stored tensor: checkpoints store the
# logical expert layout whatever they are, so a run may resume with other values, and a checkpoint written before
# they existed lacks them (their defaults, the behaviour of such a writer, apply).
EXECUTION_FIELDS = ("redundant_experts", "sync_free")
# The ModelConfig fields added after checkpoints existed, with the value a checkpoint without them means (the model
# of such a writer): no MTP modules.
ADDED_MODEL_FIELDS = {"mtp_depth": 0}


def _comparable(config: dict) -> dict:
    """A ``ModelConfig.to_dict()`` without the ``EXECUTION_FIELDS`` of its ``moe`` entry, ``ADDED_MODEL_FIELDS``
    filled in where absent."""
    config = {**ADDED_MODEL_FIELDS, **config}
    moe = config.get("moe")
    if not isinstance(moe, dict):
        return config
    return {**config, "moe": {k: v for k, v in moe.items() if k not in EXECUTION_FIELDS}}


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    sampler: BatchSampler, parallel: ParallelState, cfg: TrainConfig) -> Path:
    """The training state after ``step`` updates into ``OUT/ckpt/step_XXXX`` (collective); returns the folder."""
    fields = dict(step=step, train_config=cfg.to_dict(), data=sampler.state_dict(step))
    return write_checkpoint(step_dir(out_dir, step), model, parallel, fields, optimizer, rng=True)


def _as_json(value):
    return json.loads(json.dumps(value))


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Each nested field on which ``saved`` and ``current`` differ, a field missing on one side included."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key not in saved or key not in current:
            where = "the checkpoint" if key not in saved else "this run's config"
            out.append(f"{prefix}{key}: not in {where}")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


def model_config_from(values, where: str) -> ModelConfig:
    """``ModelConfig.from_dict(values)``, else ``CheckpointError`` naming ``where`` and the field at fault.

    Every field of ``ModelConfig`` and of its ``moe`` entry must be present
    (a default would silently stand in for the writer's value; not for
    ``EXECUTION_FIELDS``, which shape no stored tensor, nor for
    ``ADDED_MODEL_FIELDS``, whose absence means their default) and no other;
    the values must pass their validation.
    """
    moe = values.get("moe") if isinstance(values, dict) else None
    for prefix, cls, given in (("model_config", ModelConfig, values), ("model_config.moe", MoEConfig, moe)):
        if not isinstance(given, dict):
            raise CheckpointError(f"{where}: field {prefix} is missing or not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        optional = set(EXECUTION_FIELDS) if cls is MoEConfig else set(ADDED_MODEL_FIELDS)
        for what, odd in (("missing", names - set(given) - optional), ("unknown", set(given) - names)):
            if odd:
                raise CheckpointError(f"{where}: field {prefix}.{sorted(odd)[0]} is {what}")
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: field model_config is invalid: {exc}") from exc


def load_model(folder: Path, parallel: Optional[ParallelState] = None, **moe_overrides) -> MoETransformerLM:
    """The model of checkpoint ``folder`` with its weights (any saved layout), built at ``parallel``'s layout.

    ``parallel`` None: one process. ``moe_overrides`` replace ``MoEConfig``
    fields of the saved config that shape no tensor (e.g.
    ``eval_capacity_factor=None``). Collective over ``parallel``'s world.
    """
    parallel = parallel or ParallelState()
    checkpoint = open_checkpoint(folder, parallel)
    config = model_config_from(checkpoint.manifest["model_config"], str(checkpoint.folder / MANIFEST))
    if moe_overrides:
        config = config.replace(moe=config.moe.replace(**moe_overrides))
    model = MoETransformerLM(config, parallel)
    load_model_tensors(checkpoint, model, parallel)
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
        """Install the saved state into ``optimizer`` (over the model's own parameters, any param groups), the
        experts' moments moved to the model's placements (collective when there are some)."""
        with logical_layout(self.flat.model, optimizer):
            self.flat.load_optimizer_state(optimizer, self.optimizer_state)


def restore_training_state(folder: Path, model: nn.Module, sampler: BatchSampler, parallel: ParallelState,
                           cfg: TrainConfig) -> RestoredState:
    """Load weights, buffers and RNG of ``folder`` (written at any layout) into this run; read its optimizer state.

    Raises ``CheckpointError`` (a ``ValueError``) naming the file or field
    when the checkpoint is incomplete, damaged, holds no optimizer state, or
    belongs to another model, data or trajectory (see the module docstring).
    """
    checkpoint = open_checkpoint(folder, parallel)
    folder, manifest = checkpoint.folder, checkpoint.manifest
    diff = _differences(_comparable(manifest["model_config"]), _comparable(_as_json(model.config.to_dict())))
    if diff:
        raise CheckpointError(f"{folder / MANIFEST}: the model config differs from this run's: " + "; ".join(diff))
    if "optimizer" not in manifest["contents"] or manifest["train_config"] is None or manifest["data"] is None:
        raise CheckpointError(f"{folder}: holds {manifest['contents']} without a training state (converted "
                              f"weights?); it can initialise a model but not resume training")
    for field, saved_values, needed in (("train_config", manifest["train_config"], TRAJECTORY_FIELDS),
                                        ("data", manifest["data"], sampler.state_dict(0))):
        missing = [k for k in needed if k not in saved_values]
        if missing:
            raise CheckpointError(f"{folder / MANIFEST}: field {field}.{missing[0]} is missing")
    changed = [f"{k}: checkpoint {manifest['train_config'][k]!r}, this run {getattr(cfg, k)!r}"
               for k in TRAJECTORY_FIELDS if manifest["train_config"][k] != _as_json(getattr(cfg, k))]
    if changed:
        raise CheckpointError(f"{folder / MANIFEST}: training settings differ: " + "; ".join(changed))
    try:
        step = sampler.check_resume(manifest["data"])
    except ValueError as exc:
        raise CheckpointError(f"{folder / MANIFEST}: {exc}") from exc

    rank = rank_of(parallel)
    saved = checkpoint.metadata.state_dict_metadata
    same_world = manifest["layout"]["world_size"] == parallel.world_size * parallel.pp_size \
        and manifest["layout"].get("pp_size", 1) == parallel.pp_size
    rng = {k: torch.empty_like(v) for k, v in rng_tensors(rank).items()
           if k in saved} if same_world and "rng" in manifest["contents"] else {}
    with logical_layout(model):  # the stored layout; the optimizer state is read in it too (load_optimizer)
        flat = FlatState(model, parallel)
        targets = model_targets(flat, set(saved), folder)
        optim_targets, optim_state = flat.optimizer_targets({k: m for k, m in saved.items() if k.startswith(OPTIM)})
        load_tensors({**targets, **optim_targets, **rng}, folder, checkpoint.metadata, group_of(parallel))
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
