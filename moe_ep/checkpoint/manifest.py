"""The JSON manifest of a checkpoint folder, its file checksums, and finding the latest complete checkpoint.

A checkpoint folder (``OUT/ckpt/step_0030``) holds the files written by
``torch.distributed.checkpoint`` (``__<rank>_0.distcp``, ``.metadata``) and
``manifest.json``. The manifest is written last: by rank 0, after every rank
has finished writing (a barrier), to a temporary name that is then renamed.
A folder is therefore complete exactly when ``manifest.json`` exists; a save
cut short by a crash leaves a folder without it, which ``latest_checkpoint``
skips with a warning.

Manifest fields::

    format, format_version  "moe_ep.checkpoint", 1
    step                    optimizer updates done when it was written
    contents                which tensor groups it holds: model, optimizer, rng
    layout                  world_size, ep_size, dp_size of the writing run
    model_config            ModelConfig.to_dict() (its "moe" entry is the MoEConfig)
    train_config            TrainConfig.to_dict(), or null (converted weights)
    data                    BatchSampler.state_dict(step), or null
    versions                moe_ep, torch, python of the writer
    files                   every other file of the folder: {name: {bytes, sha256}}

Loading checks every listed file's size and SHA-256 before reading any of
them, so a truncated or garbled file is reported by name before anything is
deserialised.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

MANIFEST = "manifest.json"
FORMAT = "moe_ep.checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file, key or field at fault."""


def step_dir(out_dir: Path, step: int) -> Path:
    """``OUT/ckpt/step_XXXX``: the folder of the checkpoint written after ``step`` updates."""
    return Path(out_dir) / "ckpt" / f"step_{step:04d}"


def versions() -> dict:
    from .. import __version__

    return dict(moe_ep=__version__, torch=torch.__version__, python=platform.python_version())


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Checksum every file of ``folder``, then write ``manifest.json`` atomically (the completion mark)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    full = dict(format=FORMAT, format_version=FORMAT_VERSION, **manifest, versions=versions(),
                files={p.name: dict(bytes=p.stat().st_size, sha256=sha256_of(p)) for p in files})
    target = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(full, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(folder)
    return target


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete checkpoint; ``CheckpointError`` naming the file if absent or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so {folder} is not a complete checkpoint (a save that did not "
                              f"finish, or not a moe_ep checkpoint folder)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is garbled") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r}, this moe_ep reads "
                              f"{FORMAT_VERSION}")
    missing = [k for k in ("step", "contents", "layout", "model_config", "files") if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: fields {missing} are missing")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size and SHA-256, else ``CheckpointError``."""
    for name, expected in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, {MANIFEST} records {expected['bytes']}: the file is "
                                  f"truncated or was rewritten")
        if sha256_of(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 differs from the one in {MANIFEST}: the file is garbled")


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The complete checkpoint folder with the highest step under ``out_dir/ckpt``, or None.

    Folders without ``manifest.json`` (a save cut short) are skipped with a
    warning in favour of the previous complete one.
    """
    root = Path(out_dir) / "ckpt"
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.search(p.name))),
                   reverse=True)
    for _, folder in found:
        if (folder / MANIFEST).is_file():
            return folder
        warnings.warn(f"skipping incomplete checkpoint {folder}: it has no {MANIFEST} (its save did not finish)",
                      stacklevel=2)
    return None
