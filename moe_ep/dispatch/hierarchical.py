"""Two-hop, node-aware dispatch (DeepSeek-V3): one copy per destination node across nodes.

An EP group of D = N x L ranks spans N nodes of L ranks; this rank is node n,
local index l. With the same keep decisions as the flat dispatcher (step 0:
the owners of the experts decide, with global keys, before any hidden state
moves):

1. Hop 1, inter-node group (the N ranks with local index l): token t goes
   once to each node m holding at least one of its kept experts, to rank
   (m, l). Its routing row carries the gate values and node-local expert
   ids (``expert - m * E/N``, -1 for slots on other nodes).
2. Hop 2, intra-node group (the L ranks of node m): the forwarding rank sends
   each received row once to each rank j of its node holding one of its
   experts, with rank-local expert ids (-1 elsewhere) and gate values.
3. The experts run on the received rows (``apply_experts``).
4. Combine, reversed: results go back over hop 2 and are summed per
   (token, node) on the forwarding rank, so hop 1's combine also moves one
   row per (token, node); the home rank sums them per token.

So inter-node rows per token = distinct remote nodes among its kept experts
(at most M with node-limited routing), never more than the flat dispatcher's
distinct remote ranks. Every rank makes the same collective calls in the same
order (keys over the EP group, then counts, rows and routing rows of hop 1,
then of hop 2, then both combines), whatever the routing.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..dropping import DropRule, PairKeys
from ..parallel.state import ParallelState
from .local import DispatchResult
from .rows import Hop, decide_keep, destination_hits, plan_rows, run_received, split_route, traffic


class HierarchicalDispatcher:
    """Moves tokens to their experts in two hops (across nodes, then inside the node) and back.

    Needs the inter- and intra-node groups of ``init_expert_parallel``.
    ``overlap``: run the shared experts while hop 1 is in flight.
    """

    def __init__(self, parallel: ParallelState, n_experts: int, overlap: bool = True):
        if parallel.internode_group is None or parallel.intranode_group is None:
            raise ValueError("HierarchicalDispatcher: the ParallelState has no internode_group / intranode_group; "
                             "build it with moe_ep.init_expert_parallel(ep_size, nodes) or use dispatcher='flat'")
        for name, group, expected in (("internode_group", parallel.internode_group, parallel.node_index),
                                      ("intranode_group", parallel.intranode_group, parallel.local_index)):
            if dist.get_rank(group) != expected:
                raise ValueError(f"HierarchicalDispatcher: this rank is rank {dist.get_rank(group)} of {name}, "
                                 f"expected {expected} (EP rank {parallel.ep_rank}, {parallel.nodes} nodes)")
        self.parallel = parallel
        self.experts_per_rank = n_experts // parallel.ep_size
        self.experts_per_node = self.experts_per_rank * parallel.ranks_per_node
        self.overlap = overlap

    def __call__(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 keys: Optional[PairKeys], rule: Optional[DropRule], experts,
                 overlap: Optional[Callable[[], torch.Tensor]] = None) -> DispatchResult:
        parallel = self.parallel
        T, K = topk_idx_TK.shape
        D, N, L = parallel.ep_size, parallel.nodes, parallel.ranks_per_node
        rank_TK = topk_idx_TK // self.experts_per_rank
        if rule is not None:
            keep_TK = decide_keep(keys, rule, rank_TK.flatten(), D, parallel.ep_group).view(T, K)
        else:
            keep_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)

        # Hop 1: one row per (token, node) to the same local index there.
        node_kept_TK = torch.where(keep_TK, topk_idx_TK // self.experts_per_node, torch.full_like(rank_TK, N))
        inter = Hop(plan_rows(node_kept_TK, topk_idx_TK, topk_weight_TK, N, self.experts_per_node),
                    parallel.internode_group)
        x_node, route_node = inter.dispatch(x_TH)
        overlap_out = overlap() if (overlap is not None and self.overlap) else None

        # Hop 2: forward one row per (received row, rank of this node holding one of its experts).
        weight_node_SK, expert_node_SK = split_route(route_node, K)
        local_SK = torch.where(expert_node_SK >= 0, expert_node_SK // self.experts_per_rank,
                               torch.full_like(expert_node_SK, L))
        intra = Hop(plan_rows(local_SK, expert_node_SK, weight_node_SK, L, self.experts_per_rank),
                    parallel.intranode_group)
        x_rank, route_rank = intra.dispatch(x_node)
        y_rank, processed = run_received(x_rank, route_rank, K, experts)

        # Combine: sum per (token, node) here, then one row per (token, node) back across nodes.
        y_node = intra.combine(y_rank, x_node.shape[0])
        y_TH = inter.combine(y_node, T)
        if overlap is not None and not self.overlap:
            overlap_out = overlap()

        rank_kept_TK = torch.where(keep_TK, rank_TK, torch.full_like(rank_TK, D))
        internode = inter.send_D.sum() - inter.send_D[parallel.node_index]
        intranode = intra.send_D.sum() - intra.send_D[parallel.local_index]
        stats = traffic(inter.send_D.sum() + intra.send_D.sum(), inter.recv_D.sum() + intra.recv_D.sum(),
                        internode, intranode, x_TH.shape[1] * x_TH.element_size(),
                        destination_hits(rank_kept_TK, D).sum(1))
        return DispatchResult(y_TH, keep_TK, overlap_out, torch.tensor(processed, device=x_TH.device), stats)
