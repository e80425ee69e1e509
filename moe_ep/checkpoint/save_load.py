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
* dtypes: floating-point tensors are cast to the model's (a student saved in
  bf16 resumes in fp32, ``load_model`` builds fp32 and the distiller casts);
* RNG: at the same world size every rank gets back its own generator state,
  so a resumed run draws the same numbers as one that never stopped. At
  another world size there is no such correspondence (the only training-time
  draw is the router jitter, drawn per rank for the rank's tokens), so every
  rank seeds its generator from (seed, step, rank) instead: with
  ``router_jitter = 0``, as in every model preset, no draw happens in training
  and the resumed losses match the uninterrupted run's.

Integrity (``integrity.py``): on save each rank checksums the files it wrote;
on load each rank checks a share of the files, every rank raises the same
first error, and only then is ``.metadata`` parsed, once per rank, and
checked to name exactly the files the manifest covers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata

from ..data import BatchSampler
from ..parallel.state import ParallelState
from .folders import clear_folder, is_checkpoint_file
from .integrity import checksums, on_every_rank, verify_files
from .manifest import MANIFEST, METADATA, CheckpointError, read_manifest, step_dir, write_manifest
from .storage import load_tensors, read_metadata, save_tensors
from .tensors import MODEL, OPTIM, FlatState, restore_rng, rng_tensors

if TYPE_CHECKING:
    from ..models import ModelConfig, MoETransformerLM
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
    existing folder of the same name is replaced only when it holds nothing
    but checkpoint files (a complete checkpoint or a save cut short): they
    are removed, manifest first, so it is never seen complete with mixed
    contents. Any other entry raises ``CheckpointError`` on every rank and
    nothing is removed (``folders.clear_folder``).
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
    group = _group(parallel)

    def make_room() -> None:
        if rank == 0:
            clear_folder(folder, is_checkpoint_file, "moe_ep checkpoint")

    on_every_rank(make_room, group)  # also the barrier before anyone writes
    written = save_tensors(tensors, folder, group)
    own = written + [METADATA] if rank == 0 else written  # .metadata: written by rank 0, DCP's coordinator
    files = {}
    for table in on_every_rank(lambda: checksums(folder, own), group):  # all files on disk, each hashed once
        files.update(table)
    if rank == 0:
        write_manifest(folder, dict(fields, contents=contents, layout=layout_of(parallel),
                                    model_config=model.config.to_dict()), files)
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


@dataclass
class OpenCheckpoint:
    """A checkpoint folder whose files were checked: its manifest and its parsed DCP metadata."""

    folder: Path
    manifest: dict
    metadata: Metadata


def open_checkpoint(folder: Path, parallel: ParallelState) -> OpenCheckpoint:
    """Read ``folder``'s manifest, check its files, parse its DCP metadata once (collective over ``parallel``).

    Each rank checks the size and SHA-256 of its share of the files
    (``integrity.share``); any failure is raised on every rank, naming the
    file, before anything is deserialised. The metadata must name exactly
    the files the manifest covers.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest["files"]
    verify_files(folder, files, _group(parallel))
    metadata = read_metadata(folder)
    named = {METADATA} | {info.relative_path for info in metadata.storage_data.values()}
    for names, why in ((named - set(files), f"which {METADATA} names, is not covered by {MANIFEST}"),
                       (set(files) - named, f"is listed in {MANIFEST} but {METADATA} does not name it")):
        if names:
            raise CheckpointError(f"{folder / sorted(names)[0]}: {why}")
    return OpenCheckpoint(folder, manifest, metadata)


def model_config_from(values, where: str) -> ModelConfig:
    """``ModelConfig.from_dict(values)``, else ``CheckpointError`` naming ``where`` and the field at fault.

    Every field of ``ModelConfig`` and of its ``moe`` entry must be present
    (a default would silently stand in for the writer's value) and no other;
    the values must pass their validation.
    """
    from ..config import MoEConfig
    from ..models import ModelConfig

    moe = values.get("moe") if isinstance(values, dict) else None
    for prefix, cls, given in (("model_config", ModelConfig, values), ("model_config.moe", MoEConfig, moe)):
        if not isinstance(given, dict):
            raise CheckpointError(f"{where}: field {prefix} is missing or not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        for what, odd in (("missing", names - set(given)), ("unknown", set(given) - names)):
            if odd:
                raise CheckpointError(f"{where}: field {prefix}.{sorted(odd)[0]} is {what}")
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: field model_config is invalid: {exc}") from exc


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
    checkpoint = open_checkpoint(folder, parallel)
    _load_model_tensors(checkpoint, model, parallel)
    return checkpoint.manifest


def _load_model_tensors(checkpoint: OpenCheckpoint, model: nn.Module, parallel: ParallelState) -> None:
    flat = FlatState(model, parallel)
    targets = _model_targets(flat, set(checkpoint.metadata.state_dict_metadata), checkpoint.folder)
    load_tensors(targets, checkpoint.folder, checkpoint.metadata, _group(parallel))


def load_model(folder: Path, parallel: Optional[ParallelState] = None, **moe_overrides) -> "MoETransformerLM":
    """The model of checkpoint ``folder`` with its weights (any saved layout), built at ``parallel``'s layout.

    ``parallel`` None: one process. ``moe_overrides`` replace ``MoEConfig``
    fields of the saved config that shape no tensor (e.g.
    ``eval_capacity_factor=None``). Collective over ``parallel``'s world.
    """
    from ..models import MoETransformerLM

    parallel = parallel or ParallelState()
    checkpoint = open_checkpoint(folder, parallel)
    config = model_config_from(checkpoint.manifest["model_config"], str(checkpoint.folder / MANIFEST))
    if moe_overrides:
        config = config.replace(moe=config.moe.replace(**moe_overrides))
    model = MoETransformerLM(config, parallel)
    _load_model_tensors(checkpoint, model, parallel)
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
    checkpoint = open_checkpoint(folder, parallel)
    folder, manifest = checkpoint.folder, checkpoint.manifest
    diff = _differences(manifest["model_config"], _as_json(model.config.to_dict()))
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

    rank = _rank(parallel)
    flat = FlatState(model, parallel)
    saved = checkpoint.metadata.state_dict_metadata
    targets = _model_targets(flat, set(saved), folder)
    optim_targets, optim_state = flat.optimizer_targets({k: m for k, m in saved.items() if k.startswith(OPTIM)})
    same_world = manifest["layout"]["world_size"] == parallel.world_size
    rng = {k: torch.empty_like(v) for k, v in rng_tensors(rank).items()
           if k in saved} if same_world and "rng" in manifest["contents"] else {}
    load_tensors({**targets, **optim_targets, **rng}, folder, checkpoint.metadata, _group(parallel))
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
