"""Building blocks of the all-to-all dispatchers: keep decisions, row plans, hops.

A *row plan* turns the K slots of each source row into one row per (source
row, destination) that holds at least one kept pair:

    rows      = {(s, d) : some slot k of s has dest_SK[s, k] = d}     (sorted by d, then s)
    route_R   = [g_k if slot k goes to d else 0 | expert_k - d * per_dest if it does else -1]   (k = 1..K)

A *hop* is one all-to-all of a plan over a process group: the row counts
first (8 bytes per destination, synchronised to the host), then the rows
``x[s]`` and their routing rows, and, on the way back, the results summed per
source row. The flat dispatcher makes one hop (destination = EP rank); the
two-hop dispatcher makes two (destination = node, then rank within the node).
Rows and routing rows go through the autograd-aware functional all-to-all, so
gradients flow back through every hop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.profiler import record_function

from ..dropping import DropRule, PairKeys
from .local import apply_experts


def exchange(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int],
             group: dist.ProcessGroup) -> torch.Tensor:
    """Non-differentiable uneven all-to-all of rows."""
    out = tensor.new_empty(sum(recv_counts), *tensor.shape[1:])
    dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=group)
    return out


def exchange_counts(send_D: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Per-destination counts out, per-source counts in (one int64 each)."""
    recv_D = torch.empty_like(send_D)
    dist.all_to_all_single(recv_D, send_D, group=group)
    return recv_D


def decide_keep(keys: PairKeys, rule: DropRule, owner_P: torch.Tensor, n_owners: int,
                group: dist.ProcessGroup) -> torch.Tensor:
    """Keep flag of each pair, decided by the rank owning its expert (``owner_P``, a rank of ``group``).

    The owners receive the ranking keys of every pair bound for their experts
    (whole buckets: the global view), apply ``rule`` exactly as the
    single-process layer does, and return one flag per pair. No hidden state
    moves before this.
    """
    order_P = torch.argsort(owner_P, stable=True)
    send_D = torch.bincount(owner_P, minlength=n_owners)
    recv_D = exchange_counts(send_D, group)
    send, recv = send_D.tolist(), recv_D.tolist()
    packed_P5 = torch.stack([keys.expert_P.double(), keys.affinity_P.double(), keys.protected_P.double(),
                             keys.token_P.double(), keys.slot_P.double()], dim=1)[order_P]
    got = exchange(packed_P5, send, recv, group)
    received = PairKeys(expert_P=got[:, 0].long(), affinity_P=got[:, 1], protected_P=got[:, 2].bool(),
                        token_P=got[:, 3].long(), slot_P=got[:, 4].long())
    keep_back = exchange(rule(received).to(torch.uint8), recv, send, group)
    keep_P = torch.empty_like(keep_back)
    keep_P[order_P] = keep_back
    return keep_P.bool()


def destination_hits(dest_SK: torch.Tensor, n_dest: int) -> torch.Tensor:
    """Bool ``[S, n_dest]``: row s has a slot bound for d (slots with ``dest = n_dest`` go nowhere)."""
    hit_SD = torch.zeros(dest_SK.shape[0], n_dest + 1, dtype=torch.bool, device=dest_SK.device)
    return hit_SD.scatter_(1, dest_SK, True)[:, :n_dest]


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
    """One all-to-all of a row plan over ``group`` (collective: exchanges the counts on construction)."""

    def __init__(self, plan: RowPlan, group: dist.ProcessGroup):
        self.plan, self.group = plan, group
        self.send_D = plan.send_D
        self.recv_D = exchange_counts(self.send_D, group)
        self.send, self.recv = self.send_D.tolist(), self.recv_D.tolist()

    def dispatch(self, x_SH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Issue the rows ``x_SH[src_R]`` and their routing rows; returns what arrives (rows, routing rows)."""
        with record_function("moe_ep.dispatch"):
            return self._dispatch(x_SH)

    def _dispatch(self, x_SH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_recv = all_to_all_single_autograd(x_SH[self.plan.src_R], self.recv, self.send, self.group)
        route_recv = all_to_all_single_autograd(self.plan.route_RK2, self.recv, self.send, self.group)
        return x_recv, route_recv

    def combine(self, y_recv: torch.Tensor, n_src: int) -> torch.Tensor:
        """Send the received rows' results back and sum them per source row: ``[n_src, H]``."""
        with record_function("moe_ep.combine"):
            y_back = all_to_all_single_autograd(y_recv, self.send, self.recv, self.group)
            return y_back.new_zeros(n_src, y_back.shape[1]).index_add_(0, self.plan.src_R, y_back)


def run_received(x_recv: torch.Tensor, route_recv: torch.Tensor, K: int, experts) -> tuple[torch.Tensor, int]:
    """Expand received rows to (row, local expert) pairs and run ``apply_experts``.

    Returns the weighted sums per received row and the number of pairs computed.
    The received buffers become plain tensors first (kernels read their data
    pointers; ``wait_tensor`` keeps autograd, an ``AsyncCollectiveTensor`` does not expose them).
    """
    x_recv, route_recv = wait_tensor(x_recv), wait_tensor(route_recv)
    weight_SK, local_SK = split_route(route_recv, K)
    src_P, slot_P = (local_SK >= 0).nonzero(as_tuple=True)
    y_recv = apply_experts(x_recv, src_P, local_SK[src_P, slot_P], weight_SK[src_P, slot_P], experts)
    return y_recv, src_P.numel()


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
