"""Token dropping: which (token, expert) pairs fit the capacity.

Two limits, applied in this order when both are set:

* expert capacity (GShard / Switch): ``C_e = ceil(cf * T * K / N_r)`` pairs
  per expert;
* device capacity (DeepSeek-V2 §2.2.4): ``C_d = ceil(cf * T * K / D)`` pairs
  per device, counted over every sender of the expert-parallel group.

T is every token of the scope (the expert-parallel group). Within a bucket
(expert or device) pairs are ranked: protected pairs first (sequences never
dropped), then by priority (``affinity``: highest s_{i,t} first, V2 / V-MoE;
``position``: GShard's order, all first choices before any second choice,
earlier tokens first), ties broken by the global pair order. A pair is kept
when it is protected or its rank is below the capacity. The function works
on any subset of pairs that holds whole buckets, which is how the
expert-parallel dispatcher applies it on the receiving rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PairKeys:
    """Ranking keys of P (token, expert) pairs.

    expert_P: global expert id; affinity_P: s_{i,t} (unbiased score);
    protected_P: bool, the pair's sequence is never dropped;
    token_P: global token index (rank-major over the scope);
    slot_P: the pair's position k in the token's top-k list.
    """

    expert_P: torch.Tensor
    affinity_P: torch.Tensor
    protected_P: torch.Tensor
    token_P: torch.Tensor
    slot_P: torch.Tensor


def capacity(capacity_factor: float, n_tokens: int, top_k: int, n_buckets: int) -> int:
    """Pairs one bucket may hold: ``ceil(cf * T * K / n_buckets)``."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_buckets)


def _keep_within(bucket_P: torch.Tensor, keys: PairKeys, cap: int, policy: str,
                 n_tokens: int, top_k: int) -> torch.Tensor:
    """Keep mask of pairs ranked below ``cap`` in their bucket (protected always kept)."""
    P = bucket_P.numel()
    if P == 0:
        return torch.ones(0, dtype=torch.bool, device=bucket_P.device)
    if policy == "position":
        order_P = keys.slot_P * n_tokens + keys.token_P
    else:
        order_P = keys.token_P * top_k + keys.slot_P
    # Stable sorts from the least to the most significant key.
    perm = torch.argsort(order_P, stable=True)
    if policy == "affinity":
        perm = perm[torch.argsort(-keys.affinity_P[perm], stable=True)]
    perm = perm[torch.argsort((~keys.protected_P[perm]).to(torch.int8), stable=True)]
    perm = perm[torch.argsort(bucket_P[perm], stable=True)]
    sorted_bucket = bucket_P[perm]
    first_of_bucket = torch.searchsorted(sorted_bucket, sorted_bucket, right=False)
    rank_sorted = torch.arange(P, device=bucket_P.device) - first_of_bucket
    keep_sorted = (rank_sorted < cap) | keys.protected_P[perm]
    keep_P = torch.empty_like(keep_sorted)
    keep_P[perm] = keep_sorted
    return keep_P


@dataclass
class DropRule:
    """The capacity limits of one forward pass over a scope of ``n_tokens`` tokens."""

    n_tokens: int
    top_k: int
    n_experts: int
    n_devices: int
    expert_cf: Optional[float]
    device_cf: Optional[float]
    policy: str

    def __call__(self, keys: PairKeys) -> torch.Tensor:
        """Bool [P]: which pairs survive the expert then the device capacity.

        The pairs may be any subset holding whole buckets; ``n_tokens`` is T
        of the whole scope.
        """
        keep_P = torch.ones_like(keys.expert_P, dtype=torch.bool)
        if self.expert_cf is not None:
            cap = capacity(self.expert_cf, self.n_tokens, self.top_k, self.n_experts)
            keep_P &= _keep_within(keys.expert_P, keys, cap, self.policy, self.n_tokens, self.top_k)
        if self.device_cf is not None:
            cap = capacity(self.device_cf, self.n_tokens, self.top_k, self.n_devices)
            device_P = keys.expert_P // (self.n_experts // self.n_devices)
            # Pairs already dropped by the expert limit go to a bucket of their own
            # (index D), so they use no device budget; keep_P is already False for them.
            device_P = torch.where(keep_P, device_P, torch.full_like(device_P, self.n_devices))
            keep_P &= _keep_within(device_P, keys, cap, self.policy, self.n_tokens, self.top_k)
        return keep_P


def protected_sequences(seq_index_S: torch.Tensor, n_seq_total: int, fraction: float, step: int) -> torch.Tensor:
    """Bool [S]: sequences never dropped at this step.

    ``floor(fraction * B)`` of the B sequences of the scope are protected: the
    window ``[offset, offset + n)`` of global sequence indices (mod B), with
    ``offset = step * n mod B`` so the protected set rotates through the
    data. Deterministic from (step, global index), so every rank agrees
    without communication.
    """
    n_protect = math.floor(fraction * n_seq_total)
    if n_protect == 0:
        return torch.zeros_like(seq_index_S, dtype=torch.bool)
    offset = (step * n_protect) % n_seq_total
    return ((seq_index_S - offset) % n_seq_total) < n_protect
