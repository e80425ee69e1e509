"""Expert-parallel dispatch: one row per (token, destination rank), both ways.

Steps on every rank of the expert-parallel group (docs/dispatch.md has the
diagram and message sizes):

0. (dropping only) send each pair's ranking keys to the rank owning its
   expert; the owner applies the capacity rule to all pairs of its experts
   (whole buckets, global knowledge) and returns one keep flag per pair.
1. Deduplicate: token t goes to rank d once if any kept pair of t lives on d.
2. Counts first: all-to-all of the per-destination row counts (8 bytes each).
3. Tokens: all-to-all of the rows ``[R, H]`` and of their routing rows
   ``[R, 2K]`` (gate values, and local expert ids, -1 for slots elsewhere).
4. The receiver expands rows to (row, local expert) pairs and runs
   ``apply_experts`` (sort by expert, grouped experts, x gate, sum per row).
5. Combine: the summed rows go back with the reverse splits (one row per
   (token, destination) again) and the home rank adds them per token.

Shared experts (``overlap``) run while step 3 is in flight. Every rank makes
the same collective calls in the same order whatever the routing, so skewed
or empty batches cannot hang. Forward and backward go through the
autograd-aware functional all-to-all (``rows.Hop``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..dropping import DropRule, PairKeys
from ..parallel.state import ParallelState
from .local import DispatchResult
from .rows import Hop, decide_keep, plan_rows, run_received, traffic


class AllToAllDispatcher:
    """Moves tokens to the ranks owning their experts and the results back, in one hop.

    ``overlap``: run the shared experts while the dispatch all-to-all is in
    flight (set False to measure the difference).
    """

    def __init__(self, parallel: ParallelState, n_experts: int, overlap: bool = True):
        self.parallel = parallel
        self.group = parallel.ep_group
        self.ep_size = parallel.ep_size
        self.experts_per_rank = n_experts // parallel.ep_size
        self.overlap = overlap

    def __call__(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 keys: Optional[PairKeys], rule: Optional[DropRule], experts,
                 overlap: Optional[Callable[[], torch.Tensor]] = None) -> DispatchResult:
        T, K = topk_idx_TK.shape
        D, per_rank = self.ep_size, self.experts_per_rank
        dest_TK = topk_idx_TK // per_rank
        if rule is not None:
            keep_TK = decide_keep(keys, rule, dest_TK.flatten(), D, self.group).view(T, K)
        else:
            keep_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)

        # 1-2. one row per (token, destination) holding at least one kept pair; counts first.
        dest_kept_TK = torch.where(keep_TK, dest_TK, torch.full_like(dest_TK, D))
        hop = Hop(plan_rows(dest_kept_TK, topk_idx_TK, topk_weight_TK, D, per_rank), self.group)

        # 3. rows and routing rows; shared experts meanwhile.
        x_recv, route_recv = hop.dispatch(x_TH)
        overlap_out = overlap() if (overlap is not None and self.overlap) else None

        # 4. the experts of this rank.
        y_recv, processed = run_received(x_recv, route_recv, K, experts)

        # 5. combine.
        y_TH = hop.combine(y_recv, T)
        if overlap is not None and not self.overlap:
            overlap_out = overlap()

        return DispatchResult(y_TH, keep_TK, overlap_out, torch.tensor(processed, device=x_TH.device),
                              self._traffic(hop, x_TH))

    def _traffic(self, hop: Hop, x_TH: torch.Tensor) -> dict:
        """Rows to ranks of other nodes are inter-node, to other ranks of this node intra-node."""
        parallel = self.parallel
        node_D = torch.arange(self.ep_size, device=x_TH.device) // parallel.ranks_per_node
        same_node_D = node_D == parallel.node_index
        send_D = hop.send_D
        internode = send_D[~same_node_D].sum()
        intranode = send_D[same_node_D].sum() - send_D[parallel.ep_rank]
        return traffic(send_D.sum(), hop.recv_D.sum(), internode, intranode,
                       x_TH.shape[1] * x_TH.element_size(), hop.plan.hit_SD.sum(1))
