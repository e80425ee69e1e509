"""Sharded reads and writes of flat tensor state dicts with ``torch.distributed.checkpoint`` (DCP).

``save_tensors`` writes a ``{key: Tensor | DTensor}`` dict collectively:
each rank writes the chunks it holds (a DTensor's local shard, replicated
tensors deduplicated so one rank writes each), and the coordinator writes
DCP's ``.metadata`` (which chunk of which key is where); it returns the
names of the files this rank wrote. ``read_metadata`` parses
``.metadata`` once; ``load_tensors`` then fills a dict of the same kind in
place from that parsed metadata, each rank reading the rows its own tensors
cover from whichever saved chunks overlap them: that is the resharding.
Floating-point chunks are cast to the target's dtype (a bf16 student loads
into an fp32 model); every other dtype must match.

What loading deserialises, and how:

* tensor chunks in ``__<rank>_<n>.distcp``: DCP's reader uses
  ``torch.load(weights_only=True)`` (tensors and plain containers only);
* ``.metadata``: DCP pickles a ``Metadata`` dataclass. ``read_metadata``
  reads it with an unpickler that resolves only DCP's metadata classes,
  torch dtypes, ``torch.Size`` and ``pathlib`` paths, and refuses any other
  global, so no code named by the file can run; every file name it holds
  must stay inside the folder (``manifest.check_name``);
* pickled objects (DCP's ``BYTE_IO`` items, used for non-tensor values):
  never written by moe_ep, and ``TensorOnlyLoadPlanner`` refuses to read
  one. Non-tensor state lives in the JSON manifest.

A read that fails raises ``CheckpointError`` naming the file.
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan

from .manifest import METADATA, CheckpointError, check_name

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``Metadata`` pickle needs (see the module docstring)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_metadata(folder: Path) -> Metadata:
    """DCP's metadata of ``folder``, read safely (module docstring); ``CheckpointError`` naming the file."""
    path = Path(folder) / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except Exception as exc:  # any unpickling failure: truncated, garbled or a refused global
        raise CheckpointError(f"{path}: cannot read DCP metadata ({type(exc).__name__}: {exc})") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__} without DCP's entries, not DCP metadata")
    for index, info in metadata.storage_data.items():
        check_name(getattr(info, "relative_path", None), f"{path}: entry {getattr(index, 'fqn', index)!r}")
    if not isinstance(getattr(metadata, "storage_meta", None), StorageMeta):
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader over metadata already read by ``read_metadata``, with errors that name the file."""

    def __init__(self, folder: Path, metadata: Metadata):
        super().__init__(str(folder))
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def read_data(self, plan: LoadPlan, planner):
        """DCP's read, one file at a time, so that a failure names the file."""
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in by_file.items():
            try:
                super().read_data(LoadPlan(items, plan.storage_data, plan.planner_data), planner).wait()
            except Exception as exc:
                raise CheckpointError(f"{Path(self.path) / relative_path}: cannot read its tensors "
                                      f"({type(exc).__name__}: {exc})") from exc
        return super().read_data(LoadPlan([], plan.storage_data, plan.planner_data), planner)


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that it refuses to unpickle a saved object."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; moe_ep "
                              f"checkpoints hold tensors only and refuse to unpickle it")


@contextlib.contextmanager
def _dcp_call(group: Optional[dist.ProcessGroup]):
    """DCP's arguments for ``group`` (None: this process alone, without DCP's warning that it assumes so)."""
    if group is not None and dist.is_initialized():
        yield dict(process_group=group)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield dict(no_dist=True)


def _unwrap(exc: CheckpointException, folder: Path) -> CheckpointError:
    """The first ``CheckpointError`` among the ranks' failures (identical on every rank).

    Any other failure came from planning the reads out of the metadata, so
    it is reported against ``.metadata``.
    """
    for failure in exc.failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return inner
    return CheckpointError(f"{Path(folder) / METADATA}: DCP cannot load what it describes ({exc})")


class _RecordingWriter(FileSystemWriter):
    """DCP's file writer that records the names of the files this rank wrote (from its write results)."""

    def __init__(self, folder: Path):
        super().__init__(str(folder), sync_files=True)
        self.written: set[str] = set()

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        self.written.update(result.storage_data.relative_path for result in future.value())
        return future


def save_tensors(tensors: dict, folder: Path, group: Optional[dist.ProcessGroup]) -> list[str]:
    """Write ``tensors`` into ``folder`` (collective over ``group``; None: this process alone).

    Returns the names of the ``.distcp`` files this rank wrote (``.metadata``
    is written by the coordinator, rank 0 of ``group``).
    """
    writer = _RecordingWriter(folder)
    with _dcp_call(group) as how:
        dcp.save(tensors, storage_writer=writer, **how)
    return sorted(writer.written)


def check_targets(tensors: dict, metadata: Metadata, folder: Path) -> None:
    """Every key of ``tensors`` is a saved tensor of its global shape and a compatible dtype, else ``CheckpointError``.

    Compatible: the same dtype, or floating point on both sides (the load
    casts to the target's dtype).
    """
    for key, target in tensors.items():
        saved = metadata.state_dict_metadata.get(key)
        if saved is None:
            raise CheckpointError(f"{folder}: has no entry {key!r}")
        if not isinstance(saved, TensorStorageMetadata):
            raise CheckpointError(f"{folder}: entry {key!r} is not a tensor")
        dtype = saved.properties.dtype
        castable = dtype == target.dtype or (dtype.is_floating_point and target.dtype.is_floating_point)
        if tuple(saved.size) != tuple(target.shape) or not castable:
            raise CheckpointError(f"{folder}: entry {key!r} is {dtype} {list(saved.size)}, this run expects "
                                  f"{target.dtype} {list(target.shape)}")


def load_tensors(tensors: dict, folder: Path, metadata: Metadata, group: Optional[dist.ProcessGroup]) -> None:
    """Fill ``tensors`` in place from ``folder``, whose parsed ``metadata`` is given (collective over ``group``).

    Keys and shapes must match the metadata's (``check_targets``).
    """
    check_targets(tensors, metadata, folder)
    try:
        with _dcp_call(group) as how:
            dcp.load(tensors, storage_reader=SafeFileSystemReader(folder, metadata), planner=TensorOnlyLoadPlanner(),
                     **how)
    except CheckpointException as exc:
        raise _unwrap(exc, folder) from exc
