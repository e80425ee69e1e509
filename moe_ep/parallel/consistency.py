"""Ranks that must agree on a set of values (a config, a layout) check it before they communicate.

``check_same_on_ranks(what, fields, group)`` is collective over ``group``:

1. every rank hashes its ``fields`` (name -> value) into a 16-byte digest
   (BLAKE2b of their ``repr``, sorted by name) and the digests are all-gathered (one
   small message, whatever the number of fields);
2. only when the digests differ, the field values themselves are all-gathered
   so that every rank can name the first field that differs and each rank's
   value, and every rank raises the same ``ValueError``.

All ranks see the same gathered digests, so they all take the same branch:
a mismatch makes every rank fail at once instead of one rank failing and the
others waiting in the next collective, and a mismatched size never reaches a
data collective (where gloo aborts on a size check and NCCL may hang or
silently read garbage).
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

_DIGEST_BYTES = 16
_MISSING = "<missing>"


def _digest(fields: Mapping[str, Any]) -> torch.Tensor:
    """BLAKE2b of the fields' reprs sorted by name, as two int64 words (order of the mapping ignored)."""
    raw = hashlib.blake2b(repr(sorted(fields.items())).encode(), digest_size=_DIGEST_BYTES).digest()
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).clone()


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """CUDA for an NCCL-only group (it cannot move CPU tensors), else CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_mismatch(what: str, fields_per_rank: list[Mapping[str, Any]], ranks: list[int]) -> Optional[str]:
    """The error message for the first field whose value differs between ranks (None if none does).

    ``fields_per_rank[i]`` belongs to global rank ``ranks[i]``. Fields are
    taken in the order of the first rank's mapping, then any only others have.
    Ranks holding the same value are listed together, e.g.
    ``MoELayer: ranks disagree on hidden_size: rank 0 has 32, rank 1 has 48``.
    """
    names = list(dict.fromkeys(name for fields in fields_per_rank for name in fields))
    for name in names:
        values = [repr(fields[name]) if name in fields else _MISSING for fields in fields_per_rank]
        if len(set(values)) == 1:
            continue
        holders: dict[str, list[int]] = {}
        for rank, value in zip(ranks, values):
            holders.setdefault(value, []).append(rank)
        parts = [f"rank {rs[0]} has {v}" if len(rs) == 1 else f"ranks {', '.join(map(str, rs))} have {v}"
                 for v, rs in holders.items()]
        return f"{what}: ranks disagree on {name}: {', '.join(parts)}"
    return None


def check_same_on_ranks(what: str, fields: Mapping[str, Any], group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless all ranks hold equal ``fields`` (see module doc).

    ``what`` names the caller in the message. ``group`` None is the default
    group. Every rank of ``group`` must call this at the same point of its
    program (it is a collective). Returns at once for a group of one rank and
    when no process group exists (a layout built without processes, e.g. one
    rank's shard of a model made offline: there is no one to compare with).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    size = dist.get_world_size(group)
    mine = _digest(fields).to(_collective_device(group))
    digests = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(digests, mine, group=group)
    if all(torch.equal(d, digests[0]) for d in digests):
        return
    fields_per_rank: list = [None] * size
    dist.all_gather_object(fields_per_rank, dict(fields), group=group)
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    raise ValueError(describe_mismatch(what, fields_per_rank, ranks))  # digests differ: some repr differs
