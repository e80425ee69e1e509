"""Checksums of a checkpoint's files, each file hashed by one rank, and the ranks' agreement on the outcome.

Saving: every rank checksums the DCP files it wrote itself (rank 0 also
``.metadata``, which it wrote as DCP's coordinator); the tables are
all-gathered and rank 0 writes them into the manifest. Loading: the files
the manifest lists are dealt out to the ranks in shares of about equal bytes
(``share``), each rank checks the size and SHA-256 of its share only, and
the outcomes are all-gathered. Either way the I/O is the checkpoint once,
not once per rank, and no rank waits in a barrier while another hashes
everything.

``on_every_rank`` runs a rank's part and exchanges the outcomes: when any
rank failed, every rank raises the same ``CheckpointError``, the first by
message (messages start with the path at fault, so among files of one
folder: the first by name).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from .manifest import MANIFEST, CheckpointError, sha256_of

T = TypeVar("T")


def on_every_rank(part: Callable[[], T], group: Optional[dist.ProcessGroup]) -> list[T]:
    """Every rank's ``part()`` in rank order (collective over ``group``; None: this process alone).

    A ``CheckpointError`` (or ``OSError``, whose message names the path)
    raised by ``part`` on any rank is raised as a ``CheckpointError`` on
    every rank after the exchange (the first by message), so no rank is left
    waiting for one that failed.
    """
    failure = None
    try:
        outcome = (None, part())
    except (CheckpointError, OSError) as exc:
        failure, outcome = exc, (str(exc), None)
    outcomes = [outcome]
    if group is not None:
        outcomes = [None] * dist.get_world_size(group)
        dist.all_gather_object(outcomes, outcome, group=group)
    errors = sorted(error for error, _ in outcomes if error is not None)
    if errors:
        raise CheckpointError(errors[0]) from failure  # this rank's own failure, if any, as the cause
    return [value for _, value in outcomes]


def checksums(folder: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {bytes, sha256}}`` of the files ``names`` of ``folder``; ``CheckpointError`` naming one unreadable."""
    out = {}
    for name in names:
        path = Path(folder) / name
        try:
            out[name] = dict(bytes=path.stat().st_size, sha256=sha256_of(path))
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot checksum it ({exc.strerror or exc})") from exc
    return out


def share(files: dict[str, dict], rank: int, world_size: int) -> list[str]:
    """The names of ``files`` ({name: {bytes, ...}}) that ``rank`` checks: shares of about equal bytes.

    Largest file first, each to the rank with the fewest bytes so far (the
    lowest such rank on ties): the same deal on every rank that reads the
    same manifest. Returned in name order.
    """
    loads = [0] * world_size
    mine = []
    for name in sorted(files, key=lambda n: (-files[n]["bytes"], n)):
        owner = loads.index(min(loads))
        loads[owner] += files[name]["bytes"]
        if owner == rank:
            mine.append(name)
    return sorted(mine)


def verify_files(folder: Path, files: dict[str, dict], group: Optional[dist.ProcessGroup]) -> None:
    """Every file of ``files`` ({name: {bytes, sha256}}) has its recorded size and SHA-256, checked once over ``group``.

    Each rank checks its ``share`` (collective over ``group``; None: this
    process checks all); a failure on any rank raises the same
    ``CheckpointError`` on every rank (``on_every_rank``), naming the file.
    """
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    on_every_rank(lambda: verify(folder, files, share(files, rank, world)), group)


def verify(folder: Path, files: dict[str, dict], names: list[str]) -> None:
    """Each file of ``names`` exists with the size and SHA-256 that ``files`` records, else ``CheckpointError``.

    The files are checked in name order; the first that fails is named.
    """
    for name in sorted(names):
        path = Path(folder) / name
        expected = files[name]
        try:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(f"{path}: {size} bytes, {MANIFEST} records {expected['bytes']}: the file "
                                      f"is truncated or was rewritten")
            if sha256_of(path) != expected["sha256"]:
                raise CheckpointError(f"{path}: SHA-256 differs from the one in {MANIFEST}: the file is garbled")
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
