"""Gradients of replicated experts: the replicas of a logical expert sum their gradients, and norms count each
logical expert once.

A logical expert e held by c_e > 1 slots (``MoELayer.placement``) computes its pairs on several slots, so
each slot's gradient holds only its share; the gradient of e is their sum,

    grad[s] <- sum over the slots s' of e of grad[s']          for every slot s of e,

computed among the holders only, in two all-to-alls over the EP group (``ReplicaSum``): every other
replica's row goes to e's first slot (its *primary*), which adds them (in slot order), and the sum goes
back to each replica. Each row travels twice, once per extra replica, and never across nodes (a logical
expert's slots share a node, ``Placement``). Both tables follow from the placement, the same on every
rank, so every rank of the EP group makes the same two calls, a rank without replicas with zero rows:
nothing can hang. Ranks then sum over the data-parallel replicas as for any expert (moe_ep/gradients.py).
Replicas start equal and receive equal gradients, so an elementwise optimizer (AdamW) keeps them equal.
``counted_rows``: the slots a gradient norm counts (one per logical expert: its primary).
"""
from __future__ import annotations

import torch
from torch import nn

from ..dispatch.exchange import exchange
from ..model_moe import moe_layers
from ..parallel.state import ParallelState
from .placement import Placement


class ReplicaSum:
    """The two exchanges of the replica sum (module docstring) for EP rank ``rank`` under ``placement``.

    ``send_rows``: this rank's non-primary replica slots (local rows), by destination rank, then slot;
    ``add_rows``: for each row received, the local row of its primary, by source rank, then slot.
    """

    def __init__(self, placement: Placement, rank: int):
        P, S, D = placement.n_slots, placement.slots_per_rank, placement.n_ranks
        q_Q = torch.arange(P)
        primary_Q = placement.slots_EC[placement.phy2log_P, 0]       # the primary slot of each slot's expert
        replica_Q = ~placement.primary_P
        src_rank_Q, dst_rank_Q = q_Q // S, primary_Q // S
        mine_Q = (replica_Q & (src_rank_Q == rank)).nonzero().flatten()
        mine_Q = mine_Q[torch.argsort(dst_rank_Q[mine_Q] * P + mine_Q)]
        self.send_rows = mine_Q - rank * S
        self.send_counts = torch.bincount(dst_rank_Q[mine_Q], minlength=D).tolist()
        incoming_Q = (replica_Q & (dst_rank_Q == rank)).nonzero().flatten()  # ascending slot: by source rank
        self.add_rows = primary_Q[incoming_Q] - rank * S
        self.recv_counts = torch.bincount(src_rank_Q[incoming_Q], minlength=D).tolist()

    def __call__(self, rows_SX: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
        """This rank's rows with every replica's row replaced by its expert's sum (collective over the EP group
        when it has several ranks)."""
        device = rows_SX.device
        send_rows, add_rows = self.send_rows.to(device), self.add_rows.to(device)
        out = rows_SX.clone()
        received = self._exchange(rows_SX[send_rows], self.send_counts, self.recv_counts, parallel)
        out.index_add_(0, add_rows, received)
        out[send_rows] = self._exchange(out[add_rows], self.recv_counts, self.send_counts, parallel)
        return out

    @staticmethod
    def _exchange(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                  parallel: ParallelState) -> torch.Tensor:
        return exchange(rows, send_counts, recv_counts, parallel.ep_group) if parallel.ep_size > 1 else rows


def sum_replica_gradients(model: nn.Module) -> None:
    """Make each replica's gradient the sum over every replica of its logical expert (module docstring).

    Collective over each replicated layer's EP group; call it on every rank after backward, before the
    data-parallel reduction and clipping. Parameters without a gradient count as zeros. No-op for layers
    without replicas.
    """
    for layer in moe_layers(model):
        placement = layer.placement
        if placement is None or int(placement.count_E.max()) == 1:
            continue
        params = list(layer.experts.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat_SX = torch.cat([p.grad.reshape(p.shape[0], -1) for p in params], dim=1)
        summed_SX = ReplicaSum(placement, layer.parallel.ep_rank)(flat_SX, layer.parallel)
        for p, part in zip(params, summed_SX.split([p[0].numel() for p in params], dim=1)):
            p.grad.copy_(part.reshape(p.grad.shape))


def counted_rows(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{id(parameter): bool [local slots]}`` for the expert stacks of layers with a placement: the slots whose
    gradient a norm counts (each logical expert's first slot); other parameters count whole."""
    out = {}
    for layer in moe_layers(model):
        if layer.placement is None:
            continue
        S = layer.placement.slots_per_rank
        rank = layer.parallel.ep_rank
        rows = layer.placement.primary_P[rank * S:(rank + 1) * S]
        for p in layer.experts.parameters():
            out[id(p)] = rows.to(p.device)
    return out
