"""Byte-level text data: a corpus split by file, and deterministic sharded batches.

Corpus (``load_corpus``):

* default: the ``*.py`` files of the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded), so no
  download is needed;
* ``path``: a text file, or a folder whose regular files (recursively,
  hidden ones skipped) are read as bytes.

Files are listed in sorted order; every ``val_every``-th file (indices
``val_every - 1, 2 * val_every - 1, ...``) goes to validation, the rest to
training, so no file is in both. A single file is split by bytes instead (its
last ``1 / val_every`` is validation). Each split is the concatenation of
its files, each followed by a 0 byte (end of document), truncated to
``max_bytes`` (validation: ``max_bytes / val_every``). Tokens are bytes:
vocabulary 256. ``tokenize_corpus`` re-encodes both splits with a
transformers tokenizer instead (for a model whose vocabulary is smaller).

Batches (``BatchSampler``): a batch is ``[B, S + 1]`` token windows (inputs
are ``[:, :-1]``, targets ``[:, 1:]``). The global batch of step ``s`` holds
``B * world_size`` windows whose starts are drawn from
``numpy.random.default_rng([seed, s])``; rank ``r`` takes windows
``[r * B, (r + 1) * B)``. Every rank of the world is a data source
(expert-parallel ranks included), the global batch depends only on
(seed, step, B * world_size), and the sampler has no state beyond the step:
runs at different world sizes with the same global batch see the same
global batches, split differently.
Validation windows are fixed: ``n_batches * B * world_size`` starts evenly
spaced over the validation split, sharded the same way.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

VOCAB_SIZE = 256
END_OF_DOCUMENT = 0


@dataclass
class Corpus:
    """Tokens of the two splits (bytes as uint8, or tokenizer ids as int64) and the files (relative paths) in each."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str]
    val_files: list[str]
    source: str

    @functools.cached_property
    def fingerprint(self) -> str:
        """Short hash of both splits (checked on resume)."""
        digest = hashlib.sha256()
        for split in (self.train, self.val):
            digest.update(split.numpy().tobytes())
        return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, tuple[Path, ...]]:
    """(root, sorted ``*.py`` files of the standard library outside site-packages), listed once per process
    (every run, sampler or test that loads the default corpus would repeat the walk). ``site-packages`` is
    pruned from the walk: globbing through it and filtering took 1-2 s."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]  # pruned, not walked and filtered
        files += [p for p in (Path(folder) / n for n in names if n.endswith(".py")) if p.is_file()]
    return root, tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def user_files(path: Path) -> tuple[Path, list[Path]]:
    """(root, sorted regular files) of a file or folder, hidden entries skipped."""
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"load_corpus: {path} is neither a file nor a folder")
    files = [p for p in path.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        raise ValueError(f"load_corpus: no files under {path}")
    return path, sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _concat(files: list[Path], limit: int) -> tuple[bytes, list[Path]]:
    """Documents joined by END_OF_DOCUMENT, cut at ``limit`` bytes, and the files that contributed."""
    out, used = bytearray(), []
    for f in files:
        if len(out) >= limit:
            break
        out += f.read_bytes() + bytes([END_OF_DOCUMENT])
        used.append(f)
    return bytes(out[:limit]), used


def _tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(path: Optional[str] = None, max_bytes: int = 8 << 20, val_every: int = 20) -> Corpus:
    """Read and split a corpus (see the module docstring)."""
    if val_every < 2:
        raise ValueError(f"load_corpus: val_every must be at least 2, got {val_every}")
    root, files = stdlib_files() if path is None else user_files(Path(path))
    val_limit = max(1, max_bytes // val_every)
    if len(files) == 1:
        data = files[0].read_bytes()
        cut = len(data) - len(data) // val_every
        train, val = data[:cut][:max_bytes], data[cut:][:val_limit]
        train_files = val_files = [files[0].name]
    else:
        val_set = files[val_every - 1::val_every]
        train_set = [f for i, f in enumerate(files) if (i + 1) % val_every]
        (train, train_used), (val, val_used) = _concat(train_set, max_bytes), _concat(val_set, val_limit)
        train_files = [f.relative_to(root).as_posix() for f in train_used]
        val_files = [f.relative_to(root).as_posix() for f in val_used]
    return Corpus(_tokens(train), _tokens(val), train_files, val_files, str(root if path is None else path))


def tokenize_corpus(corpus: Corpus, tokenizer) -> Corpus:
    """``corpus`` with each split re-encoded by a transformers ``tokenizer`` (int64 ids).

    Each document (the bytes between END_OF_DOCUMENT markers) is decoded as
    UTF-8 (invalid bytes replaced), encoded without special tokens and
    followed by ``tokenizer.eos_token_id``, which must exist.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenize_corpus: {type(tokenizer).__name__} has no eos_token to separate documents")

    def encode(split: torch.Tensor) -> torch.Tensor:
        documents = [d.decode("utf-8", errors="replace")
                     for d in split.numpy().tobytes().split(bytes([END_OF_DOCUMENT])) if d]
        ids = tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []
        return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.int64)

    return Corpus(encode(corpus.train), encode(corpus.val), corpus.train_files, corpus.val_files,
                  f"{corpus.source} (tokenized: {tokenizer.name_or_path})")


class BatchSampler:
    """Deterministic ``[B, S + 1]`` windows of one rank (see the module docstring)."""

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchSampler: rank {rank} outside world of {world_size}")
        for name, split in (("train", corpus.train), ("val", corpus.val)):
            if split.numel() < seq_len + 1:
                raise ValueError(f"BatchSampler: the {name} split has {split.numel()} tokens, "
                                 f"fewer than seq_len + 1 = {seq_len + 1}")
        self.corpus = corpus
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def _windows(self, tokens: torch.Tensor, starts: np.ndarray) -> torch.Tensor:
        mine = torch.from_numpy(starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
        index = mine[:, None] + torch.arange(self.seq_len + 1)
        return tokens[index].long()

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of every window of the global batch of ``step``."""
        rng = np.random.default_rng([self.seed, step])
        high = self.corpus.train.numel() - self.seq_len
        return rng.integers(0, high, size=self.batch_size * self.world_size, dtype=np.int64)

    def batch(self, step: int) -> torch.Tensor:
        """This rank's training windows of ``step``: LongTensor ``[B, S + 1]``."""
        return self._windows(self.corpus.train, self.global_starts(step))

    def val_batches(self, n_batches: int) -> list[torch.Tensor]:
        """This rank's fixed validation windows, ``n_batches`` tensors ``[B, S + 1]``."""
        count = n_batches * self.batch_size * self.world_size
        starts = np.linspace(0, self.corpus.val.numel() - self.seq_len - 1, count).astype(np.int64)
        per_batch = self.batch_size * self.world_size
        return [self._windows(self.corpus.val, starts[i * per_batch:(i + 1) * per_batch])
                for i in range(n_batches)]

    def state_dict(self, step: int) -> dict:
        """The data position of ``step`` and what the global batches depend on (compared on resume).

        Layout-free: the global batch size, not this rank's share, so a run
        at another world size with the same global batch resumes the same
        sequence of global batches.
        """
        return dict(step=step, seed=self.seed, global_batch_size=self.batch_size * self.world_size,
                    seq_len=self.seq_len, corpus=self.corpus.fingerprint)

    def check_resume(self, state: dict) -> int:
        """The step to continue from; raises if the saved position belongs to other data."""
        current = self.state_dict(state["step"])
        diff = {k: (state.get(k), v) for k, v in current.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"BatchSampler: checkpoint data position does not match this run: "
                             f"{ {k: f'saved {a!r}, now {b!r}' for k, (a, b) in diff.items()} }")
        return state["step"]
