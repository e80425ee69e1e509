"""Write and read checkpoint folders at any (dp, ep) layout: a model's tensors, optimizer state and RNG, or weights.

``write_checkpoint`` (collective; every rank calls it) writes a folder: the
model (single-process keys, global expert ids), optionally the optimizer
state (expert moments sharded like the experts) and every rank's RNG state
(DCP, ``tensors.py`` has the keys), then ``manifest.json`` with the fields the
caller gives (``manifest.py``). ``open_checkpoint`` checks a folder and parses
its metadata once; ``load_weights`` reads a model's tensors back at any
layout: another world size, EP size or data-parallel size, one process
included. Floating-point tensors are cast to the model's dtype (a student
saved in bf16 loads into fp32). Experts are stored in their logical layout
(each logical expert once, in id order), whatever their placement
(``MoEConfig.redundant_experts``, moe_ep/eplb/layout.py).

What a training run saves and resumes (the step, the data position, the
trajectory settings, the model built from its config) is the application's:
``moe_ep.training.checkpoints``.

Integrity (``integrity.py``): on save each rank checksums the files it wrote;
on load each rank checks a share of the files, every rank raises the same
first error, and only then is ``.metadata`` parsed, once per rank, and
checked to name exactly the files the manifest covers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata

from ..eplb.layout import logical_layout
from ..parallel.state import ParallelState
from .folders import clear_folder, is_checkpoint_file
from .integrity import checksums, on_every_rank, verify_files
from .manifest import MANIFEST, METADATA, CheckpointError, read_manifest, write_manifest
from .storage import load_tensors, read_metadata, save_tensors
from .tensors import MODEL, FlatState, rng_tensors


def rank_of(parallel: ParallelState) -> int:
    """This process's global rank (every rank of every pipeline stage takes part in a checkpoint)."""
    return dist.get_rank() if parallel.global_group is not None else 0


def barrier_of(parallel: ParallelState) -> None:
    if parallel.global_group is not None:
        dist.barrier(group=parallel.global_group)


def group_of(parallel: ParallelState) -> Optional[dist.ProcessGroup]:
    """The group a checkpoint is written and read by: every rank; None on one process."""
    return parallel.global_group


def layout_of(parallel: ParallelState) -> dict:
    """The writing run's layout; ``world_size`` counts every rank of every pipeline stage."""
    return dict(world_size=parallel.world_size * parallel.pp_size, ep_size=parallel.ep_size,
                dp_size=parallel.dp_size, pp_size=parallel.pp_size)


def write_checkpoint(folder: Path, model: nn.Module, parallel: ParallelState, fields: dict,
                     optimizer: Optional[torch.optim.Optimizer] = None, rng: bool = False) -> Path:
    """Write ``model`` (and ``optimizer`` state, RNG states) into ``folder``, manifest last (collective).

    ``fields``: the manifest's ``step``, ``train_config`` and ``data``. An
    existing folder of the same name is replaced only when it holds nothing
    but checkpoint files (a complete checkpoint or a save cut short): they
    are removed, manifest first, so it is never seen complete with mixed
    contents. Any other entry raises ``CheckpointError`` on every rank and
    nothing is removed (``folders.clear_folder``). Experts are written in their
    logical layout, whatever their placement (``eplb.layout.logical_layout``).
    """
    with logical_layout(model, optimizer):
        return _write_logical(Path(folder), model, parallel, fields, optimizer, rng)


def _write_logical(folder: Path, model: nn.Module, parallel: ParallelState, fields: dict,
                   optimizer: Optional[torch.optim.Optimizer], rng: bool) -> Path:
    rank = rank_of(parallel)
    flat = FlatState(model, parallel)
    tensors = flat.model_tensors()
    contents = ["model"]
    if optimizer is not None:  # an optimizer that has not stepped yet has no state: saved as such
        tensors.update(flat.optimizer_tensors(optimizer))
        contents.append("optimizer")
    if rng:
        tensors.update(rng_tensors(rank))
        contents.append("rng")
    group = group_of(parallel)

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
    barrier_of(parallel)
    return folder


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
    verify_files(folder, files, group_of(parallel))
    metadata = read_metadata(folder)
    named = {METADATA} | {info.relative_path for info in metadata.storage_data.values()}
    for names, why in ((named - set(files), f"which {METADATA} names, is not covered by {MANIFEST}"),
                       (set(files) - named, f"is listed in {MANIFEST} but {METADATA} does not name it")):
        if names:
            raise CheckpointError(f"{folder / sorted(names)[0]}: {why}")
    return OpenCheckpoint(folder, manifest, metadata)


def model_targets(flat: FlatState, saved_keys: set, folder: Path) -> dict:
    """The model's tensors to load; every saved model tensor must be one of them, unless this rank holds a part
    of the model (pipeline stages: the other stages' tensors are the other ranks')."""
    targets = flat.model_tensors()
    unexpected = sorted(k for k in saved_keys if k.startswith(MODEL) and k not in targets)
    if unexpected and flat.parallel.pp_size == 1:
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
    load_model_tensors(checkpoint, model, parallel)
    return checkpoint.manifest


def load_model_tensors(checkpoint: OpenCheckpoint, model: nn.Module, parallel: ParallelState) -> None:
    """Read ``checkpoint``'s model tensors into ``model`` (in the logical layout, then back to its placements)."""
    with logical_layout(model):
        flat = FlatState(model, parallel)
        targets = model_targets(flat, set(checkpoint.metadata.state_dict_metadata), checkpoint.folder)
        load_tensors(targets, checkpoint.folder, checkpoint.metadata, group_of(parallel))


