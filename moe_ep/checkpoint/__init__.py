"""Checkpoints that reshard: written by ``torch.distributed.checkpoint`` at one (dp, ep) layout, read at any.

Modules: ``manifest.py`` (the JSON manifest, its fields and file names,
completeness, ``latest_checkpoint``, ``find_checkpoint``), ``integrity.py``
(checksums, each file hashed by one rank, errors every rank raises
together), ``folders.py`` (replacing a target folder without removing
anything but checkpoint files), ``storage.py`` (DCP reads and writes that
never unpickle arbitrary objects), ``tensors.py`` (the flat, layout-free keys
of model, optimizer and RNG state), ``save_load.py`` (writing and reading a
model's tensors). A training run's state (step, data position, settings) is
``moe_ep.training.checkpoints``'s; conversions to DeepSpeed's and
transformers' layouts are ``moe_ep.training.convert``'s (``python -m
moe_ep.checkpoint convert``). docs/reliability.md describes the format and
its guarantees.
"""
from .manifest import CheckpointError, find_checkpoint, latest_checkpoint, read_manifest, step_dir
from .save_load import load_weights, write_checkpoint

__all__ = ["CheckpointError", "find_checkpoint", "latest_checkpoint", "load_weights", "read_manifest", "step_dir",
           "write_checkpoint"]
