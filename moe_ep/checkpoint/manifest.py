"""The JSON manifest of a checkpoint folder, and finding the latest complete checkpoint.

A checkpoint folder (``OUT/ckpt/step_0030``) holds the files written by
``torch.distributed.checkpoint`` (``__<rank>_0.distcp``, ``.metadata``) and
``manifest.json``. The manifest is written last: by rank 0, after every rank
has written and checksummed its own files (``integrity.py``), to a temporary
name that is then renamed. A folder is therefore complete exactly when
``manifest.json`` exists; a save cut short by a crash leaves a folder without
it, which ``latest_checkpoint`` skips with a warning.

Manifest fields::

    format, format_version  "moe_ep.checkpoint", 1
    step                    optimizer updates done when it was written
    contents                which tensor groups it holds: model, optimizer, rng
    layout                  world_size (every rank), ep_size, dp_size, pp_size (absent: 1) of the writing run
    model_config            ModelConfig.to_dict() (its "moe" entry is the MoEConfig)
    train_config            TrainConfig.to_dict(), or null (converted weights)
    data                    BatchSampler.state_dict(step), or null
    versions                moe_ep, torch, python of the writer
    files                   ``.metadata`` and every file the DCP metadata names: {name: {bytes, sha256}}

``read_manifest`` checks the structure above (every field present with its
type, file names that stay inside the folder) and raises ``CheckpointError``
naming the field; the entries of ``model_config``, ``train_config`` and
``data`` are checked where they are used.
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
METADATA = ".metadata"  # DCP's metadata file
FORMAT = "moe_ep.checkpoint"
FORMAT_VERSION = 1
CONTENTS = ("model", "optimizer", "rng")
_STEP_DIR = re.compile(r"step_(\d+)$")
_SHA256 = re.compile(r"[0-9a-f]{64}$")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file, key or field at fault."""


def step_dir(out_dir: Path, step: int) -> Path:
    """``OUT/ckpt/step_XXXX``: the folder of the checkpoint written after ``step`` updates."""
    return Path(out_dir) / "ckpt" / f"step_{step:04d}"


def versions() -> dict:
    from .. import __version__

    return dict(moe_ep=__version__, torch=torch.__version__, python=platform.python_version())


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_name(name, where: str) -> str:
    """``name`` when it names a file directly inside a folder, else ``CheckpointError`` naming ``where`` and it.

    Refused: non-strings, empty names, absolute paths, path separators
    (``/``, ``\\``), ``..`` anywhere and NUL bytes, so that no name read from
    a checkpoint can reach outside its folder.
    """
    if (not isinstance(name, str) or not name or name == "." or ".." in name or "\0" in name
            or any(sep in name for sep in ("/", "\\")) or os.path.isabs(name)):
        raise CheckpointError(f"{where}: file name {name!r} is not a plain file name inside the folder (absolute, "
                              f"'..' or a path separator)")
    return name


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, manifest: dict, files: dict) -> Path:
    """Write ``manifest.json`` with ``files`` ({name: {bytes, sha256}}) atomically: the completion mark."""
    folder = Path(folder)
    full = dict(format=FORMAT, format_version=FORMAT_VERSION, **manifest, versions=versions(),
                files=dict(sorted(files.items())))
    target = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(full, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(folder)
    return target


# Layout fields written since a later release; a checkpoint without one was written with this value.
ADDED_LAYOUT_FIELDS = {"pp_size": 1}


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_structure(path: Path, manifest: dict) -> None:
    """The fields of the module docstring, each present with its type; ``CheckpointError`` naming the first bad one."""
    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: field {field} {why}")

    for field in ("step", "contents", "layout", "model_config", "train_config", "data", "versions", "files"):
        need(field in manifest, field, "is missing")
    need(_is_count(manifest["step"], 0), "step", f"must be a non-negative int, got {manifest['step']!r}")
    contents = manifest["contents"]
    need(isinstance(contents, list) and "model" in contents and set(contents) <= set(CONTENTS), "contents",
         f"must list 'model' and only {list(CONTENTS)}, got {contents!r}")
    need(isinstance(manifest["layout"], dict), "layout", "must be an object")
    for key in ("world_size", "ep_size", "dp_size", *ADDED_LAYOUT_FIELDS):
        value = manifest["layout"].get(key, ADDED_LAYOUT_FIELDS.get(key))
        need(_is_count(value, 1), f"layout.{key}", f"must be a positive int, got {value!r}")
    for field in ("model_config", "versions"):
        need(isinstance(manifest[field], dict), field, "must be an object")
    for field in ("train_config", "data"):
        need(manifest[field] is None or isinstance(manifest[field], dict), field, "must be an object or null")
    files = manifest["files"]
    need(isinstance(files, dict), "files", "must be an object")
    need(METADATA in files, "files", f"does not list {METADATA}")
    for name, entry in files.items():
        check_name(name, f"{path}: field files")
        need(isinstance(entry, dict), f"files.{name}", "must be an object")
        need(_is_count(entry.get("bytes"), 0), f"files.{name}.bytes",
             f"must be a non-negative int, got {entry.get('bytes')!r}")
        need(isinstance(entry.get("sha256"), str) and bool(_SHA256.match(entry["sha256"])), f"files.{name}.sha256",
             f"must be 64 lowercase hex digits, got {entry.get('sha256')!r}")


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete checkpoint; ``CheckpointError`` naming the file or field if absent or malformed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so {folder} is not a complete checkpoint (a save that did not "
                              f"finish, or not a moe_ep checkpoint folder)")
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is garbled") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest (field format)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: field format_version is {manifest.get('format_version')!r}, this moe_ep "
                              f"reads {FORMAT_VERSION}")
    _check_structure(path, manifest)
    return manifest


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


def find_checkpoint(path: Path) -> Optional[Path]:
    """``path`` itself when it is a complete checkpoint folder, else ``latest_checkpoint(path)`` (a run folder).

    None when neither holds one.
    """
    path = Path(path)
    return path if (path / MANIFEST).is_file() else latest_checkpoint(path)
