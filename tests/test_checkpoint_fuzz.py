"""Fuzz: every damaged checkpoint ends in a ``CheckpointError`` naming the file or field at fault.

One real checkpoint (one process, the small model of ``checkpoint_workers``, after one step) is
written once. Each case copies it, damages the copy and loads it with every loader that must refuse
it: ``resume`` (``load_checkpoint``, the training state) and ``weights`` (``load_model``; it does not
read ``train_config`` and ``data``, so their entries are fuzzed with ``resume`` only). The damage,
drawn with ``random.Random(SEED)`` where it is random:

* each file (``manifest.json``, ``.metadata``, ``__0_0.distcp``): truncated at 3 lengths, bytes
  flipped at 3 sets of positions (1, 2 and 8 bytes), deleted;
* the manifest: each file's size and hash wrong, each field and nested field removed (every field of
  the model config but ``ADDED_MODEL_FIELDS``, whose absence means their default, 5 drawn of its
  ``moe`` entry but ``EXECUTION_FIELDS``, every trajectory field, every data entry, every layout entry
  but ``ADDED_LAYOUT_FIELDS``), values
  of the wrong type, a file left out, a file listed that the DCP metadata does not name (present or
  absent), names that leave the folder (``..``, absolute, path separators, a real file outside);
* ``.metadata`` (behind a manifest that matches it unless said otherwise): a pickle whose unpickling
  would create a marker file (also with a stale manifest), ``relative_path`` entries that leave the
  folder or name an unlisted file, a tensor's recorded shape or dtype changed, truncation;
* ``__0_0.distcp`` truncated or zeroed behind a matching manifest.

Each load is counted as ``named`` (a ``CheckpointError`` whose message holds the expected name),
``unnamed`` (a ``CheckpointError`` without it), ``crash`` (any other exception), ``silent`` (no
error: a wrong load) or ``hang`` (over ``CASE_TIMEOUT`` seconds, interrupted by SIGALRM). The test
prints the counts and requires every load to be ``named``; the marker file must never appear.
docs/reliability.md reports the counts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import random
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import torch

from moe_ep.checkpoint import CheckpointError
from moe_ep.training.checkpoints import load_checkpoint, load_model
from moe_ep.checkpoint.integrity import checksums
from moe_ep.checkpoint.manifest import ADDED_LAYOUT_FIELDS, MANIFEST, METADATA
from moe_ep.training.checkpoints import ADDED_MODEL_FIELDS, EXECUTION_FIELDS, TRAJECTORY_FIELDS
from moe_ep.checkpoint.storage import read_metadata
from moe_ep.config import MoEConfig
from moe_ep.models import ModelConfig

from . import checkpoint_workers as workers

SEED = 26
CASE_TIMEOUT = 30.0
DATA = "__0_0.distcp"
BOTH = ("resume", "weights")


@dataclasses.dataclass
class Case:
    name: str
    damage: Callable[[Path], None]
    expect: str  # a substring the error message must hold: the file or field at fault
    loaders: tuple = BOTH


class Exploit:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ damage
def truncate(name: str, length: int):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:length])


def flip(name: str, positions: list[int]):
    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        for i in positions:
            data[i] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
    return damage


def delete(name: str):
    return lambda folder: (folder / name).unlink()


def rechecksum(folder: Path) -> None:
    """Record the folder's current files in the manifest, as if the damage came before it was written."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = checksums(folder, sorted(manifest["files"]))
    (folder / MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(change: Callable[[dict], None]):
    def damage(folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST).read_text())
        change(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return damage


def remove(*path: str):
    def change(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit_manifest(change)


def set_value(value, *path: str):
    def change(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit_manifest(change)


def behind_manifest(damage: Callable[[Path], None]):
    return lambda folder: (damage(folder), rechecksum(folder))


def edit_metadata(change: Callable):
    """Rewrite ``.metadata`` with ``change(metadata)`` applied, behind a matching manifest."""
    def damage(folder: Path) -> None:
        metadata = read_metadata(folder)
        change(metadata)
        (folder / METADATA).write_bytes(pickle.dumps(metadata))
        rechecksum(folder)
    return damage


def relative_path(value: str):
    def change(metadata) -> None:
        index = next(iter(metadata.storage_data))
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path=value)
    return edit_metadata(change)


def tensor_entry(key: str, **changes):
    def change(metadata) -> None:
        entry = metadata.state_dict_metadata[key]
        if "dtype" in changes:
            entry.properties = dataclasses.replace(entry.properties, dtype=changes["dtype"])
        if "size" in changes:
            entry.size = changes["size"]
    return edit_metadata(change)


def outside_file(folder: Path) -> None:
    """A real file next to the folder, listed under ``../`` with its true size and hash."""
    outside = folder.parent / "outside.bin"
    outside.write_bytes(b"x" * 64)
    set_value(checksums(folder.parent, ["outside.bin"])["outside.bin"], "files", "../outside.bin")(folder)


def extra_listed_file(folder: Path) -> None:
    (folder / "extra.bin").write_bytes(b"not named by the DCP metadata")
    set_value(checksums(folder, ["extra.bin"])["extra.bin"], "files", "extra.bin")(folder)


def cases(original: Path, marker: Path) -> list[Case]:
    rng = random.Random(SEED)
    out = []
    for name in sorted(p.name for p in original.iterdir()):
        size = (original / name).stat().st_size
        for length in [0] + sorted(rng.sample(range(1, size - 1), 2)):
            out.append(Case(f"truncate {name} to {length}", truncate(name, length), name))
        for count in (1, 2, 8):
            positions = sorted(rng.sample(range(size), count))
            out.append(Case(f"flip {name} at {positions}", flip(name, positions), name))
        out.append(Case(f"delete {name}", delete(name), name))

    manifest = json.loads((original / MANIFEST).read_text())
    files = sorted(manifest["files"])
    for name in files:
        entry = manifest["files"][name]
        out += [Case(f"files.{name}.bytes + 1", set_value(entry["bytes"] + 1, "files", name, "bytes"), name),
                Case(f"files.{name}.bytes - 1", set_value(entry["bytes"] - 1, "files", name, "bytes"), name),
                Case(f"files.{name}.sha256 of other bytes", set_value("0" * 64, "files", name, "sha256"), name),
                Case(f"files.{name}.sha256 not hex", set_value("xyz", "files", name, "sha256"),
                     f"files.{name}.sha256"),
                Case(f"files.{name} not an object", set_value("abc", "files", name), f"files.{name}"),
                Case(f"files.{name}.bytes negative", set_value(-1, "files", name, "bytes"), f"files.{name}.bytes"),
                Case(f"remove files.{name}.bytes", remove("files", name, "bytes"), f"files.{name}.bytes"),
                Case(f"remove files.{name}.sha256", remove("files", name, "sha256"), f"files.{name}.sha256"),
                Case(f"unlist {name}", remove("files", name), name)]
    for field in sorted(manifest):
        out.append(Case(f"remove {field}", remove(field), field))
    for key in sorted(manifest["layout"]):
        if key not in ADDED_LAYOUT_FIELDS:
            out.append(Case(f"remove layout.{key}", remove("layout", key), f"layout.{key}"))
        out.append(Case(f"layout.{key} = 0", set_value(0, "layout", key), f"layout.{key}"))
    for field in sorted(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ADDED_MODEL_FIELDS):
        out.append(Case(f"remove model_config.{field}", remove("model_config", field), field))
    moe_fields = sorted(f.name for f in dataclasses.fields(MoEConfig) if f.name not in EXECUTION_FIELDS)
    for field in rng.sample(moe_fields, 5):
        out.append(Case(f"remove model_config.moe.{field}", remove("model_config", "moe", field), field))
    for field in TRAJECTORY_FIELDS:
        out.append(Case(f"remove train_config.{field}", remove("train_config", field), f"train_config.{field}",
                        ("resume",)))
    for key in sorted(manifest["data"]):
        out.append(Case(f"remove data.{key}", remove("data", key), f"data.{key}", ("resume",)))
    out += [Case("step = '1'", set_value("1", "step"), "step"),
            Case("step = -1", set_value(-1, "step"), "step"),
            Case("contents = 'model'", set_value("model", "contents"), "contents"),
            Case("contents lists 'weights'", set_value(["model", "weights"], "contents"), "contents"),
            Case("layout = []", set_value([], "layout"), "layout"),
            Case("model_config = 'tiny'", set_value("tiny", "model_config"), "model_config"),
            Case("model_config.hidden_size = 'wide'", set_value("wide", "model_config", "hidden_size"),
                 "hidden_size"),
            Case("train_config = 3", set_value(3, "train_config"), "train_config"),
            Case("versions = []", set_value([], "versions"), "versions"),
            Case("files = []", set_value([], "files"), "files"),
            Case("format = 'other'", set_value("other", "format"), "format"),
            Case("format_version = 2", set_value(2, "format_version"), "format_version"),
            Case("manifest is a list", lambda f: (f / MANIFEST).write_text("[]"), MANIFEST),
            Case("list extra.bin, not named by .metadata", extra_listed_file, "extra.bin"),
            Case("list ghost.bin, absent", set_value(dict(bytes=1, sha256="0" * 64), "files", "ghost.bin"),
                 "ghost.bin"),
            Case("list ../outside.bin, a real file", outside_file, repr("../outside.bin"))]
    for bad in ("../" + DATA, "/tmp/" + DATA, "sub/" + DATA, "sub\\" + DATA, "..", ""):
        def rename(m, bad=bad):
            m["files"][bad] = m["files"].pop(DATA)
        out.append(Case(f"files entry named {bad!r}", edit_manifest(rename), repr(bad)))

    exploit = pickle.dumps(Exploit(marker))
    model_key = next(k for k in read_metadata(original).state_dict_metadata if k.endswith("experts.w_in"))
    out += [Case("pickle payload in .metadata, stale manifest", lambda f: (f / METADATA).write_bytes(exploit),
                 METADATA),
            Case("pickle payload in .metadata", behind_manifest(lambda f: (f / METADATA).write_bytes(exploit)),
                 METADATA),
            Case("truncate .metadata behind the manifest", behind_manifest(truncate(METADATA, 100)), METADATA),
            Case(f"truncate {DATA} behind the manifest", behind_manifest(truncate(DATA, 1000)), DATA),
            Case(f"zero {DATA} behind the manifest",
                 behind_manifest(lambda f: (f / DATA).write_bytes(bytes((f / DATA).stat().st_size))), DATA),
            Case("relative_path __9_0.distcp (unlisted)", relative_path("__9_0.distcp"), "__9_0.distcp"),
            Case(f"{model_key} shape changed", tensor_entry(model_key, size=torch.Size([1, 2, 3])), model_key),
            Case(f"{model_key} dtype int64", tensor_entry(model_key, dtype=torch.int64), model_key)]
    for bad in ("../" + DATA, "/tmp/" + DATA, "sub/" + DATA):
        out.append(Case(f"relative_path {bad!r}", relative_path(bad), repr(bad)))
    return out


# ------------------------------------------------------------------ running the cases
class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(load: Callable[[Path], object], folder: Path, expect: str) -> tuple[str, str]:
    """(class, message) of one load of a damaged folder (see the module docstring)."""
    try:
        with time_limit(CASE_TIMEOUT):
            load(folder)
    except Hang:
        return "hang", f"no answer within {CASE_TIMEOUT} s"
    except CheckpointError as exc:
        return ("named" if expect in str(exc) else "unnamed"), str(exc)
    except Exception as exc:  # noqa: BLE001 - counting them is the point
        return "crash", f"{type(exc).__name__}: {exc}"
    return "silent", "loaded without an error"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A real single-process checkpoint after one step, and the two loaders."""
    from moe_ep.training.checkpoints import save_checkpoint
    from moe_ep.training.optim import build_optimizer

    out = tmp_path_factory.mktemp("fuzz")
    parallel, cfg, sampler, model = workers.setup(1, 1, out)
    optimizer = build_optimizer(model, cfg)
    workers.manual_steps(model, optimizer, sampler, parallel, cfg, 1)
    folder = save_checkpoint(out, 1, model, optimizer, sampler, parallel, cfg)
    loaders = dict(resume=lambda f: load_checkpoint(f, model, build_optimizer(model, cfg), sampler, parallel, cfg),
                   weights=load_model)
    return folder, loaders


def test_fuzz_damaged_checkpoints_raise_a_named_error(original, tmp_path):
    folder, loaders = original
    marker = tmp_path / "payload-ran"
    counts, failures = Counter(), []
    damaged = cases(folder, marker)
    for i, case in enumerate(damaged):
        copy = tmp_path / f"case{i}" / folder.name
        shutil.copytree(folder, copy)
        case.damage(copy)
        for loader in case.loaders:
            kind, message = outcome(loaders[loader], copy, case.expect)
            counts["tried"] += 1
            counts[kind] += 1
            if kind != "named":
                failures.append(f"{case.name} [{loader}]: {kind}: {message[:300]}")
        shutil.rmtree(copy.parent)
    print(f"\nfuzzed damaged checkpoints (seed {SEED}): {len(damaged)} damaged copies, {counts['tried']} loads tried, "
          f"{counts['named']} caught with a named CheckpointError, {counts['unnamed']} unnamed, {counts['crash']} "
          f"crashes, {counts['silent']} silent loads, {counts['hang']} hangs")
    assert not marker.exists(), "the pickle payload in .metadata was executed"
    assert counts["crash"] == counts["hang"] == 0, "\n".join(failures)
    assert counts["named"] == counts["tried"], "\n".join(failures)
