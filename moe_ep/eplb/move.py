"""Rows of expert-shaped tensors (weights, optimizer moments) from one placement's slots to another's, by
all-to-all over the EP group: no rank gathers more than its own new rows.

A placement here is its ``phy2log`` (the logical expert of each slot, rank-major; ``arange(E)`` is the
logical layout, expert e on rank ``e // (E / ep)``). Every rank computes the same transfer table from the
two placements, without communication:

    source(q) = the old slot of logical expert new[q] on q's own rank if there is one (a local copy),
                else old_slots[new[q]][q mod c]   (c old replicas: the senders take turns)

then one ``all_to_all_single`` per tensor moves row ``source(q)`` from its rank to the rank of slot q.
Replicas of one expert are copies of one old row, so they stay identical. ``move_expert_slots`` moves an
expert stack's parameters and the optimizer's parameter-shaped state of them (AdamW's ``exp_avg``,
``exp_avg_sq``; its scalar ``step`` is the same for every row and stays).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..dispatch.exchange import exchange
from ..parallel.state import ParallelState


class SlotTransfer:
    """The transfer table from placement ``old_P`` to ``new_Q`` seen from EP rank ``rank`` of ``n_ranks``."""

    def __init__(self, old_P: torch.Tensor, new_Q: torch.Tensor, n_ranks: int, rank: int):
        P, Q = old_P.numel(), new_Q.numel()
        self.old_per_rank, self.new_per_rank = P // n_ranks, Q // n_ranks
        E = int(max(old_P.max(), new_Q.max())) + 1
        count_E = torch.bincount(old_P, minlength=E)
        order_P = torch.argsort(old_P, stable=True)          # old slots grouped by expert
        first_E = torch.cumsum(count_E, 0) - count_E
        q_Q = torch.arange(Q)
        src_Q = order_P[first_E[new_Q] + q_Q % count_E[new_Q]]  # the senders take turns ...
        dst_rank_Q = q_Q // self.new_per_rank
        local_PQ = (old_P[:, None] == new_Q[None, :]) & (torch.arange(P)[:, None] // self.old_per_rank == dst_rank_Q)
        has_local_Q = local_PQ.any(0)
        src_Q = torch.where(has_local_Q, local_PQ.int().argmax(0), src_Q)  # ... unless q's rank holds the expert
        src_rank_Q = src_Q // self.old_per_rank
        mine_Q = src_rank_Q == rank                               # sent by this rank, in slot order = by destination
        self.send_rows = src_Q[mine_Q] - rank * self.old_per_rank
        self.send_counts = torch.bincount(dst_rank_Q[mine_Q], minlength=n_ranks).tolist()
        incoming_Q = (dst_rank_Q == rank).nonzero().flatten()    # received: by source rank, then slot
        incoming_Q = incoming_Q[torch.argsort(src_rank_Q[incoming_Q] * Q + incoming_Q)]
        self.recv_rows = incoming_Q - rank * self.new_per_rank
        self.recv_counts = torch.bincount(src_rank_Q[incoming_Q], minlength=n_ranks).tolist()

    def __call__(self, rows: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        """This rank's new rows ``[Q / ep, ...]`` from its old rows ``rows [P / ep, ...]`` (collective over ``group``
        when the EP group has several ranks)."""
        if rows.shape[0] != self.old_per_rank:
            raise ValueError(f"SlotTransfer: expected {self.old_per_rank} rows, got {rows.shape[0]}")
        sent = rows.detach()[self.send_rows.to(rows.device)]
        if len(self.send_counts) == 1:
            received = sent
        else:
            received = exchange(sent, self.send_counts, self.recv_counts, group)
        out = rows.new_empty(self.new_per_rank, *rows.shape[1:])
        out[self.recv_rows.to(rows.device)] = received
        return out


def move_expert_slots(experts: nn.Module, old_P: torch.Tensor, new_Q: torch.Tensor, parallel: ParallelState,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Move every parameter of ``experts`` (a stack whose rows are this rank's slots of ``old_P``) to the slots
    of ``new_Q``, with ``optimizer``'s state of it shaped like it; gradients are dropped.

    Collective over the EP group (every rank passes the same placements); nothing happens, and nothing
    is communicated, when they are equal. The parameters stay the same objects (their ``.data`` is
    replaced), so the optimizer keeps them.
    """
    if torch.equal(old_P, new_Q):
        return
    transfer = SlotTransfer(old_P, new_Q, parallel.ep_size, parallel.ep_rank)
    for param in experts.parameters():
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = transfer(value, parallel.ep_group)
        param.data = transfer(param.data, parallel.ep_group)
        param.grad = None
    experts.num_local_experts = transfer.new_per_rank
