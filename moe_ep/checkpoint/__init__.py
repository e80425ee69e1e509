"""Checkpoints that reshard: written by ``torch.distributed.checkpoint`` at one (dp, ep) layout, read at any.

Modules: ``manifest.py`` (the JSON manifest, its fields and file names,
completeness, ``latest_checkpoint``), ``integrity.py`` (checksums, each file
hashed by one rank, errors every rank raises together), ``folders.py``
(replacing a target folder without removing anything but checkpoint files),
``storage.py`` (DCP reads and writes that never unpickle arbitrary objects),
``tensors.py`` (the flat, layout-free keys of model, optimizer and RNG
state), ``save_load.py`` (training state and weights), ``convert.py``
(DeepSpeed and transformers layouts; also ``python -m moe_ep.checkpoint
convert``). docs/reliability.md describes the format and its guarantees.
"""
from .manifest import CheckpointError, latest_checkpoint, read_manifest, step_dir
from .save_load import (RestoredState, load_checkpoint, load_model, load_weights, restore_training_state,
                        save_checkpoint, write_checkpoint)

__all__ = ["CheckpointError", "RestoredState", "latest_checkpoint", "load_checkpoint", "load_model", "load_weights", "read_manifest",
           "restore_training_state", "save_checkpoint", "step_dir", "write_checkpoint"]
