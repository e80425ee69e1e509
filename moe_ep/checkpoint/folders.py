"""Making room for a checkpoint: an existing target is emptied only when it holds nothing but files of its kind.

Writers never remove a folder tree. ``clear_folder`` creates the target, or
removes the files in it one by one after checking that every entry is a
regular file that the writer itself produces (``is_checkpoint_file`` for a
moe_ep checkpoint); any other entry (a subfolder, a run's metrics, a source
tree passed by mistake) stops it with a ``CheckpointError`` naming that
entry, before anything is removed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from .manifest import MANIFEST, METADATA, CheckpointError

_CHECKPOINT_FILE = re.compile(rf"(__\d+_\d+\.distcp|{re.escape(METADATA)}(\.tmp)?|{re.escape(MANIFEST)}(\.tmp)?)$")


def is_checkpoint_file(name: str) -> bool:
    """A name that a moe_ep checkpoint save writes: DCP's files, the manifest, or their temporary names."""
    return bool(_CHECKPOINT_FILE.match(name))


def is_empty(folder: Path) -> bool:
    """``folder`` is absent or an empty folder."""
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def clear_folder(folder: Path, owned: Callable[[str], bool], kind: str) -> None:
    """Create ``folder``, or empty it when each entry is a regular file whose name ``owned`` accepts.

    ``kind`` names what such a folder holds, for the error. The manifest,
    when present, goes first, so a checkpoint being replaced is never seen
    complete with mixed contents.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; refusing to replace it with a {kind}")
    folder.mkdir(parents=True, exist_ok=True)
    entries = sorted(folder.iterdir(), key=lambda p: (p.name != MANIFEST, p.name))
    foreign = [p for p in entries if p.is_symlink() or not p.is_file() or not owned(p.name)]
    if foreign:
        raise CheckpointError(f"{folder}: holds {foreign[0].name!r}, which is not a file of a {kind}; refusing to "
                              f"replace the folder (nothing was removed)")
    for path in entries:
        path.unlink()
