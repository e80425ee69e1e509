"""The dispatcher: tokens to the ranks owning their experts and the results back, as a list of hops.

Steps on every rank of the expert-parallel group (docs/dispatch.md has the
diagram and message sizes):

0. (dropping only) send each pair's ranking keys to the rank owning its
   expert; the owner applies the capacity rule to all pairs of its experts
   (whole buckets, global knowledge) and returns one keep flag per pair.
1. For each hop of the route, in order: one row per (row, destination of
   the hop) holding a kept pair (deduplication), the counts first, then the
   rows and their routing rows (gate values, destination-local expert ids).
2. The experts of this rank run on the (row, local expert) pairs that
   arrived (``rows.apply_experts``).
3. Combine: the hops in reverse order, each summing its results per source row.

The route is a list of ``HopLevel``s: none on one EP rank (the experts run on
the tokens themselves: the single-process reference), one for the flat
all-to-all over the EP group, two for the node-aware path of DeepSeek-V3
(across nodes to the rank with the same local index, then inside the node).
So inter-node rows per token are its distinct remote nodes (at most M with
node-limited routing) on the two-hop route, its distinct remote ranks on the
flat one. Every rank makes the same collective calls in the same order
whatever its routing, so skewed or empty batches cannot hang.

``side_work`` (the shared experts) runs while the first hop's rows are in
flight when ``overlap_shared`` (on a GPU, on a side stream: ``side_stream``),
else after the combine; without hops it runs before the experts.

With a ``placement`` (``moe_ep.eplb``: replicas, experts moved between ranks)
the hops carry physical slot ids instead of expert ids: after step 0 (decided
by the expert's home rank ``e // (E / ep)``, as without a placement) each kept
pair is given one slot of its expert (``Placement.slots``), and the route
moves it to the rank holding that slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..config import DISPATCHERS
from ..dropping import DropRule, PairKeys
from ..eplb.placement import Placement
from ..parallel.links import LinkRoute
from ..parallel.state import ParallelState
from ..router import destination_hits
from .padded import PaddedDispatcher
from .exchange import ep_link_route
from .rows import DispatchResult, Hop, RowPlan, apply_experts, decide_keep, open_hops, plan_rows, split_route, traffic


@dataclass(frozen=True)
class HopLevel:
    """One hop of the route.

    group: its process group (``n_dest`` ranks); per_dest: experts each
    destination holds, contiguous in the ids the sending rows carry (global
    ids on the first hop, ids local to the previous hop's destination after);
    route: which destinations share this rank's node and this rank's index
    in ``group`` (traffic counters, emulated links).
    """

    group: dist.ProcessGroup
    n_dest: int
    per_dest: int
    route: LinkRoute


@dataclass
class _Rows:
    """A chunk's rows at one point of the route: rows, their (local) expert ids and gate values per slot."""

    x_SH: torch.Tensor
    expert_SK: torch.Tensor
    weight_SK: torch.Tensor
    valid_SK: torch.Tensor


class Dispatcher:
    """Moves kept (token, expert) pairs along ``levels`` to their experts and the results back (module docstring).

    ``chunks`` (``MoEConfig.overlap_chunks``): split each rank's tokens into
    that many contiguous chunks after the keep decisions and pipeline them
    (docs/dispatch.md, "Overlap"); 1 runs the route once. ``placement``:
    the slots of the experts when not one per expert in id order (module
    docstring); ``levels`` must then split its slots.
    """

    def __init__(self, parallel: ParallelState, n_experts: int, levels: tuple[HopLevel, ...],
                 overlap_shared: bool = True, chunks: int = 1, placement: Optional[Placement] = None):
        self.parallel = parallel
        self.experts_per_rank = n_experts // parallel.ep_size
        self.placement = placement
        self.slots_per_rank = placement.slots_per_rank if placement is not None else self.experts_per_rank
        self.levels = levels
        self.overlap_shared = overlap_shared
        self.chunks = chunks
        self.ep_route = ep_link_route(parallel)

    @property
    def kind(self) -> str:
        """``local`` (no hop), ``flat`` (one) or ``hierarchical`` (two)."""
        return ("local", "flat", "hierarchical")[len(self.levels)]

    def __call__(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 keys: Optional[PairKeys], rule: Optional[DropRule], experts,
                 side_work: Optional[Callable[[], torch.Tensor]] = None) -> DispatchResult:
        parallel = self.parallel
        T, K = topk_idx_TK.shape
        D = parallel.ep_size
        rank_TK = topk_idx_TK // self.experts_per_rank
        if rule is not None:
            keep_TK = decide_keep(keys, rule, rank_TK.flatten(), D, parallel.ep_group, self.ep_route).view(T, K)
        else:
            keep_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)
        slot_TK, dest_TK = topk_idx_TK, rank_TK
        if self.placement is not None:  # each kept pair to one slot of its expert
            slot_TK = self.placement.slots(topk_idx_TK, keep_TK, parallel.ep_rank)
            dest_TK = slot_TK // self.slots_per_rank
        rows = _Rows(x_TH, slot_TK, topk_weight_TK, keep_TK)
        if not self.levels:
            side_out = side_work() if side_work is not None else None
            y_TH, processed = self._experts(rows, experts)
            return DispatchResult(y_TH, keep_TK, side_out, processed)

        y_TH, processed, hops, side_out = self._pipeline(rows, experts, side_work)
        dest_ranks_T = destination_hits(torch.where(keep_TK, dest_TK, torch.full_like(dest_TK, D)), D).sum(1)
        return DispatchResult(y_TH, keep_TK, side_out, processed,
                              self._traffic(hops, x_TH.shape[1] * x_TH.element_size(), dest_ranks_T))

    def _pipeline(self, rows: _Rows, experts, side_work) -> tuple[torch.Tensor, torch.Tensor, list, Optional[torch.Tensor]]:
        """The route, chunk by chunk, with the first hops of chunks i + 1.. in flight while chunk i runs.

        The first hop's counts of every chunk travel first, in one
        all-to-all; then the first hop's rows of every chunk are issued, in
        chunk order, so the link never waits for the experts. Then per chunk
        i, in this order on every rank (so the collectives match): chunk i's
        first hop is received, its inner hops (if any) are sent and received,
        the experts run, the inner hops' combines complete, and the first
        hop's combine of chunk i is issued; all first-hop combines are
        received at the end. So the first hops of the later chunks and the
        combine of chunk i - 1 are in flight while chunk i is computed, and
        the inner hops of chunk i overlap the first hops of the later chunks.
        Autograd runs the backward in the mirror order. The side work runs
        after the sends are issued (or after the combines without
        ``overlap_shared``). With more than one chunk the chunks' expert
        calls share one weight gradient (``experts.share_weight_grads``,
        ``moe_ep.expert_ffn.SharedWeightGrads``), opened after the sends: its
        weight products run in the backward once every chunk's gradient has
        been sent back, while the last of them travels.
        """
        outer, inner = self.levels[0], self.levels[1:]
        bounds = torch.linspace(0, rows.x_SH.shape[0], self.chunks + 1).round().long().tolist()
        chunk_rows = [_Rows(*(t[lo:hi] for t in (rows.x_SH, rows.expert_SK, rows.weight_SK, rows.valid_SK)))
                      for lo, hi in zip(bounds[:-1], bounds[1:])]
        outer_hops = open_hops([self._plan(r, outer) for r in chunk_rows], outer.group, outer.route,
                               [f"hop0.chunk{i}" for i in range(self.chunks)])
        hops, backs, processed = list(outer_hops), [], []
        side_out = None
        sent = [hop.send(r.x_SH) for hop, r in zip(outer_hops, chunk_rows)]
        shared_grads = experts.share_weight_grads(rows.x_SH.dtype) if self.chunks > 1 else None
        if side_work is not None and self.overlap_shared:
            side_out = side_work()
        for i, (hop, pending) in enumerate(zip(outer_hops, sent)):
            arrived = self._arrive(hop.receive(pending), rows.expert_SK.shape[1])
            stack = []
            for depth, level in enumerate(inner, start=1):
                (inner_hop,) = open_hops([self._plan(arrived, level)], level.group, level.route,
                                         [f"hop{depth}.chunk{i}"])
                hops.append(inner_hop)
                stack.append((inner_hop, arrived.x_SH.shape[0]))
                arrived = self._arrive(inner_hop.receive(inner_hop.send(arrived.x_SH)), rows.expert_SK.shape[1])
            y_SH, count = self._experts(arrived, experts, shared_grads)
            processed.append(count)
            for inner_hop, n_src in reversed(stack):
                y_SH = inner_hop.receive_back(inner_hop.send_back(y_SH), n_src)
            backs.append((hop, hop.send_back(y_SH), chunk_rows[i].x_SH.shape[0]))
        y_TH = torch.cat([hop.receive_back(pending, n_src) for hop, pending, n_src in backs])
        if side_work is not None and side_out is None:
            side_out = side_work()
        return y_TH, torch.stack(processed).sum(), hops, side_out

    @staticmethod
    def _plan(rows: _Rows, level: HopLevel) -> RowPlan:
        """The row plan of ``rows`` at ``level``."""
        dest_SK = torch.where(rows.valid_SK, rows.expert_SK // level.per_dest,
                              torch.full_like(rows.expert_SK, level.n_dest))
        return plan_rows(dest_SK, rows.expert_SK, rows.weight_SK, level.n_dest, level.per_dest)

    @staticmethod
    def _arrive(received: tuple[torch.Tensor, torch.Tensor], K: int) -> _Rows:
        x_SH, route_SK2 = received
        weight_SK, expert_SK = split_route(route_SK2, K)
        return _Rows(x_SH, expert_SK, weight_SK, expert_SK >= 0)

    @staticmethod
    def _experts(rows: _Rows, experts, shared_grads=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts on every valid (row, slot) pair of ``rows``, summed per row, and the pairs computed."""
        src_P, slot_P = rows.valid_SK.nonzero(as_tuple=True)
        y_SH = apply_experts(rows.x_SH, src_P, rows.expert_SK[src_P, slot_P], rows.weight_SK[src_P, slot_P],
                             experts, shared_grads)
        return y_SH, torch.tensor(src_P.numel(), device=rows.x_SH.device)

    @staticmethod
    def _traffic(hops: list[Hop], row_bytes: int, dest_ranks_T: torch.Tensor) -> dict:
        """Rows of every hop: to destinations on other nodes inter-node, to others of this node intra-node."""
        sent = received = internode = intranode = 0
        for hop in hops:
            same_D = torch.tensor(hop.route.same_node_D, device=hop.send_D.device)
            sent = sent + hop.send_D.sum()
            received = received + hop.recv_D.sum()
            internode = internode + hop.send_D[~same_D].sum()
            intranode = intranode + hop.send_D[same_D].sum() - hop.send_D[hop.route.self_index]
        return traffic(sent, received, internode, intranode, row_bytes, dest_ranks_T)


def _flat_levels(parallel: ParallelState, n_experts: int) -> tuple[HopLevel, ...]:
    D = parallel.ep_size
    return (HopLevel(parallel.ep_group, D, n_experts // D, ep_link_route(parallel)),)


def _two_hop_levels(parallel: ParallelState, n_experts: int) -> tuple[HopLevel, ...]:
    if parallel.internode_group is None or parallel.intranode_group is None:
        raise ValueError("dispatcher='hierarchical': the ParallelState has no internode_group / intranode_group; "
                         "build it with moe_ep.init_expert_parallel(ep_size, nodes) or use dispatcher='flat'")
    for name, group, expected in (("internode_group", parallel.internode_group, parallel.node_index),
                                  ("intranode_group", parallel.intranode_group, parallel.local_index)):
        if dist.get_rank(group) != expected:
            raise ValueError(f"dispatcher='hierarchical': this rank is rank {dist.get_rank(group)} of {name}, "
                             f"expected {expected} (EP rank {parallel.ep_rank}, {parallel.nodes} nodes)")
    N, L = parallel.nodes, parallel.ranks_per_node
    return (HopLevel(parallel.internode_group, N, n_experts // N,
                     LinkRoute(tuple(m == parallel.node_index for m in range(N)), parallel.node_index)),
            HopLevel(parallel.intranode_group, L, n_experts // parallel.ep_size,
                     LinkRoute((True,) * L, parallel.local_index)))


def make_dispatcher(choice: str, parallel: ParallelState, n_experts: int, overlap_shared: bool = True,
                    chunks: int = 1, placement: Optional[Placement] = None,
                    sync_free: bool = False) -> Dispatcher | PaddedDispatcher:
    """The dispatcher for ``MoEConfig.dispatcher`` = ``choice`` on ``parallel``.

    ``sync_free`` (``MoEConfig.sync_free``): the capacity-padded ``PaddedDispatcher`` (moe_ep/dispatch/padded.py),
    one all-to-all over the EP group whatever ``choice`` is (``MoEConfig`` refuses ``hierarchical``, chunks and
    placements with it).

    One EP rank: no hop whatever the choice. Otherwise ``flat`` (one hop
    over the EP group), ``hierarchical`` (two), or ``auto``: hierarchical
    when the EP group spans more than one node (``parallel.nodes > 1``) with
    more than one rank on each (with one rank per node both send the same
    rows across nodes, and the second hop would only copy rows to itself)
    and the state has the node groups that ``init_expert_parallel`` builds;
    flat otherwise. ``chunks``, ``placement``: ``Dispatcher``'s (the hops split the placement's slots).
    """
    if choice not in DISPATCHERS:
        raise ValueError(f"make_dispatcher: unknown dispatcher {choice!r}; choose from {DISPATCHERS}")
    if sync_free:
        return PaddedDispatcher(parallel, n_experts, overlap_shared)
    if parallel.ep_size == 1:
        return Dispatcher(parallel, n_experts, (), overlap_shared, chunks, placement)
    if choice == "auto":
        has_node_groups = parallel.internode_group is not None and parallel.intranode_group is not None
        spans_nodes = parallel.nodes > 1 and parallel.ranks_per_node > 1
        choice = "hierarchical" if spans_nodes and has_node_groups else "flat"
    n_slots = placement.n_slots if placement is not None else n_experts
    levels = _two_hop_levels(parallel, n_slots) if choice == "hierarchical" else _flat_levels(parallel, n_slots)
    return Dispatcher(parallel, n_experts, levels, overlap_shared, chunks, placement)
