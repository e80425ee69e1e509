"""Where rows are handled: keep decisions, row plans, hops, and the experts applied to received rows.

A *row plan* turns the K slots of each source row into one row per (source
row, destination) that holds at least one kept pair:

    rows      = {(s, d) : some slot k of s has dest_SK[s, k] = d}     (sorted by d, then s)
    route_R   = [g_k if slot k goes to d else 0 | expert_k - d * per_dest if it does else -1]   (k = 1..K)

A *hop* is one all-to-all of a plan over a process group: the row counts
first (8 bytes per destination, synchronised to the host), then the rows
``x[s]`` and their routing rows, and, on the way back, the results summed per
source row. Rows and routing rows go through the differentiable c10d
all-to-all of ``exchange.RowExchange``, so gradients flow back through every
hop. ``apply_experts`` runs the experts on (row, local expert) pairs: on the
rows that arrived, or on the tokens themselves when no hop is made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..dropping import DropRule, PairKeys
from ..parallel.links import LinkRoute
from ..router import destination_hits
from .exchange import RowExchange, exchange, exchange_counts


@dataclass
class DispatchResult:
    """y_TH: routed output; keep_TK: which of this rank's pairs were kept;
    side_out: what the side work (``Dispatcher.__call__``'s ``side_work``)
    returned; processed_pairs: (row, expert) pairs this rank's experts
    computed (0-d int64), counted where the experts run, independently of
    ``keep_TK``; traffic: per-rank message sizes (empty on one process)."""

    y_TH: torch.Tensor
    keep_TK: torch.Tensor
    side_out: Optional[torch.Tensor]
    processed_pairs: torch.Tensor
    traffic: dict = field(default_factory=dict)


def apply_experts(x_SH: torch.Tensor, src_R: torch.Tensor, expert_R: torch.Tensor, weight_R: torch.Tensor,
                  experts, shared_grads=None) -> torch.Tensor:
    """Weighted expert outputs summed per source row.

        y_S[s] = sum_{r : src_R[r] = s} FFN_{expert_R[r]}(x_S[s]) * weight_R[r]

    The pairs are stably sorted by (local) expert; the experts read their rows
    of ``x_SH`` through that index (no gathered copy is kept for backward).
    ``shared_grads``: the experts' ``SharedWeightGrads`` (moe_ep.expert_ffn) of this layer call's chunks.
    """
    order_R = torch.argsort(expert_R, stable=True)
    counts_E = torch.bincount(expert_R, minlength=experts.num_local_experts)
    return experts(x_SH, src_R[order_R], counts_E, weight_R[order_R], shared_grads)


def decide_keep(keys: PairKeys, rule: DropRule, owner_P: torch.Tensor, n_owners: int,
                group: Optional[dist.ProcessGroup], route: Optional[LinkRoute] = None) -> torch.Tensor:
    """Keep flag of each pair, decided by the rank owning its expert (``owner_P``, a rank of ``group``).

    The owners receive the ranking keys of every pair bound for their experts
    (whole buckets: the global view), apply ``rule`` exactly as the
    single-process layer does, and return one flag per pair. No hidden state
    moves before this. One owner (no group): ``rule(keys)`` here. ``route``:
    the group's node layout, for the emulated links.
    """
    if n_owners == 1:
        return rule(keys)
    order_P = torch.argsort(owner_P, stable=True)
    send_D = torch.bincount(owner_P, minlength=n_owners)
    recv_D = exchange_counts(send_D, group, route)
    send, recv = send_D.tolist(), recv_D.tolist()
    packed_P5 = torch.stack([keys.expert_P.double(), keys.affinity_P.double(), keys.protected_P.double(),
                             keys.token_P.double(), keys.slot_P.double()], dim=1)[order_P]
    got = exchange(packed_P5, send, recv, group, route, "keys")
    received = PairKeys(expert_P=got[:, 0].long(), affinity_P=got[:, 1], protected_P=got[:, 2].bool(),
                        token_P=got[:, 3].long(), slot_P=got[:, 4].long())
    keep_back = exchange(rule(received).to(torch.uint8), recv, send, group, route, "keep")
    keep_P = torch.empty_like(keep_back)
    keep_P[order_P] = keep_back
    return keep_P.bool()


def route_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of routing rows: the gate dtype promoted to at least fp32, so ids below 2^24 are exact."""
    return torch.promote_types(weight_dtype, torch.float32)


def split_route(route_RK2: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate values [R, K]`` with their gradient, ``local expert ids [R, K]`` as int64, -1 = elsewhere)."""
    return route_RK2[:, :K], route_RK2[:, K:].detach().long()


@dataclass
class RowPlan:
    """Rows of one hop. src_R: source row of each row; dest_R: its destination;
    route_RK2: gate values and destination-local expert ids (float, see
    ``route_dtype``); hit_SD: which destinations each source row reaches."""

    src_R: torch.Tensor
    dest_R: torch.Tensor
    route_RK2: torch.Tensor
    hit_SD: torch.Tensor

    @property
    def send_D(self) -> torch.Tensor:
        """Rows per destination."""
        return self.hit_SD.sum(0)


def plan_rows(dest_SK: torch.Tensor, expert_SK: torch.Tensor, weight_SK: torch.Tensor, n_dest: int,
              per_dest: int) -> RowPlan:
    """One row per (source row, destination) holding a slot; see the module docstring.

    ``dest_SK``: destination of each slot, ``n_dest`` for a slot sent nowhere;
    ``expert_SK``: the slot's expert id, of which destination d holds
    ``[d * per_dest, (d + 1) * per_dest)``.
    """
    hit_SD = destination_hits(dest_SK, n_dest)
    dest_R, src_R = hit_SD.t().nonzero(as_tuple=True)
    match_RK = dest_SK[src_R] == dest_R[:, None]
    elsewhere_R1 = torch.full_like(dest_R, -1)[:, None]
    local_RK = torch.where(match_RK, expert_SK[src_R] - dest_R[:, None] * per_dest, elsewhere_R1)
    dtype = route_dtype(weight_SK.dtype)
    route_RK2 = torch.cat([(weight_SK[src_R] * match_RK).to(dtype), local_RK.to(dtype)], dim=1)
    return RowPlan(src_R, dest_R, route_RK2, hit_SD)


class Hop:
    """One all-to-all of a row plan over a hop level's group, both ways, each way in two halves.

    ``recv_D``: the rows each source sends here (from ``open_hops``).
    ``send`` issues the rows and routing rows, ``receive`` completes them;
    ``send_back`` issues the results, ``receive_back`` completes them and
    sums them per source row. The caller may compute between the halves
    (the dispatcher's pipeline). ``label`` names the hop in the emulated
    links' timeline.
    """

    def __init__(self, plan: RowPlan, group: dist.ProcessGroup, route: Optional[LinkRoute], label: str,
                 recv_D: torch.Tensor):
        self.plan, self.group, self.route, self.label = plan, group, route, label
        self.send_D, self.recv_D = plan.send_D, recv_D
        self.send_counts, self.recv_counts = self.send_D.tolist(), recv_D.tolist()

    def send(self, x_SH: torch.Tensor) -> tuple[tuple[RowExchange, torch.Tensor], ...]:
        """Issue ``x_SH[src_R]`` and the routing rows."""
        with record_function("moe_ep.dispatch"):
            rows = RowExchange(self.send_counts, self.recv_counts, self.group, self.route, self.label + ".dispatch")
            routes = RowExchange(self.send_counts, self.recv_counts, self.group, self.route, self.label + ".route")
            return (rows, rows.issue(x_SH[self.plan.src_R])), (routes, routes.issue(self.plan.route_RK2))

    @staticmethod
    def receive(pending: tuple[tuple[RowExchange, torch.Tensor], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """What arrived: (rows, routing rows)."""
        with record_function("moe_ep.dispatch"):
            (rows, x_pending), (routes, route_pending) = pending
            return rows.wait(x_pending), routes.wait(route_pending)

    def send_back(self, y_recv: torch.Tensor) -> tuple[RowExchange, torch.Tensor]:
        """Issue the received rows' results back to their senders."""
        with record_function("moe_ep.combine"):
            back = RowExchange(self.recv_counts, self.send_counts, self.group, self.route, self.label + ".combine")
            return back, back.issue(y_recv)

    def receive_back(self, pending: tuple[RowExchange, torch.Tensor], n_src: int) -> torch.Tensor:
        """The results summed per source row: ``[n_src, H]``."""
        with record_function("moe_ep.combine"):
            back, y_pending = pending
            y_back = back.wait(y_pending)
            return y_back.new_zeros(n_src, y_back.shape[1]).index_add_(0, self.plan.src_R, y_back)


def open_hops(plans: list[RowPlan], group: dist.ProcessGroup, route: Optional[LinkRoute],
              labels: list[str]) -> list[Hop]:
    """The hops of several plans over one group, their counts exchanged in one all-to-all (collective).

    Every rank passes the same number of plans. Destination d receives the
    counts of all plans as one block, ``[n_plans]`` per source.
    """
    send_DC = torch.stack([plan.send_D for plan in plans], dim=1)
    ones = [1] * send_DC.shape[0]
    recv_DC = exchange(send_DC, ones, ones, group, route, "counts")
    return [Hop(plan, group, route, label, recv_DC[:, c]) for c, (plan, label) in enumerate(zip(plans, labels))]


def traffic(rows_sent: torch.Tensor, rows_received: torch.Tensor, internode_rows: torch.Tensor,
            intranode_rows: torch.Tensor, row_bytes: int, dest_ranks_T: torch.Tensor) -> dict:
    """The ``traffic`` dict of a dispatcher (0-d tensors; docs/dispatch.md defines each entry)."""
    empty = dest_ranks_T.numel() == 0
    return {
        "rows_sent": rows_sent, "rows_received": rows_received,
        "bytes_sent": rows_sent * row_bytes, "bytes_received": rows_received * row_bytes,
        "internode_rows_sent": internode_rows, "intranode_rows_sent": intranode_rows,
        "internode_bytes_sent": internode_rows * row_bytes, "intranode_bytes_sent": intranode_rows * row_bytes,
        "dest_ranks_per_token_mean": torch.zeros(()) if empty else dest_ranks_T.float().mean(),
        "dest_ranks_per_token_max": torch.zeros((), dtype=torch.long) if empty else dest_ranks_T.max(),
    }
