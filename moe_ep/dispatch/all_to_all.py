"""Expert-parallel dispatch: one row per (token, destination rank), both ways.

Steps on every rank of the expert-parallel group (docs/dispatch.md has the
diagram and message sizes):

0. (dropping only) send each pair's ranking keys to the rank owning its
   expert; the owner applies the capacity rule to all pairs of its experts
   (whole buckets, global knowledge) and returns one keep flag per pair.
1. Deduplicate: token t goes to rank d once if any kept pair of t lives on d.
2. Counts first: all-to-all of the per-destination row counts (8 bytes each).
3. Tokens: all-to-all of the rows ``[R, H]`` and of their routing rows
   ``[R, 2K]`` (local expert ids, -1 for slots elsewhere, and gate values).
4. The receiver expands rows to (row, local expert) pairs, sorts them by
   expert, runs the grouped experts, multiplies by the gate values and sums
   per row.
5. Combine: the summed rows go back with the reverse splits (one row per
   (token, destination) again) and the home rank adds them per token.

Shared experts (``overlap``) run while step 3 is in flight. Every rank makes
the same collective calls in the same order whatever the routing, so skewed
or empty batches cannot hang. Forward and backward go through the
autograd-aware functional all-to-all.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from ..dropping import DropRule, PairKeys
from ..parallel.state import ParallelState
from .local import DispatchResult, apply_experts


def _exchange(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    """Non-differentiable uneven all-to-all of rows."""
    out = tensor.new_empty(sum(recv_counts), *tensor.shape[1:])
    dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=group)
    return out


def _exchange_counts(send_D: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    recv_D = torch.empty_like(send_D)
    dist.all_to_all_single(recv_D, send_D, group=group)
    return recv_D


class AllToAllDispatcher:
    """Moves tokens to the ranks owning their experts and the results back.

    ``overlap``: run the shared experts while the dispatch all-to-all is in
    flight (set False to measure the difference).
    """

    def __init__(self, parallel: ParallelState, n_experts: int, overlap: bool = True):
        self.parallel = parallel
        self.group = parallel.ep_group
        self.ep_size = parallel.ep_size
        self.experts_per_rank = n_experts // parallel.ep_size
        self.overlap = overlap

    def _decide_keep(self, keys: PairKeys, rule: DropRule, dest_P: torch.Tensor) -> torch.Tensor:
        """Step 0: the owners of the experts rank all their pairs and return keep flags."""
        order_P = torch.argsort(dest_P, stable=True)
        send_D = torch.bincount(dest_P, minlength=self.ep_size)
        recv_D = _exchange_counts(send_D, self.group)
        send, recv = send_D.tolist(), recv_D.tolist()
        packed_P5 = torch.stack([keys.expert_P.double(), keys.affinity_P.double(), keys.protected_P.double(),
                                 keys.token_P.double(), keys.slot_P.double()], dim=1)[order_P]
        got = _exchange(packed_P5, send, recv, self.group)
        received = PairKeys(expert_P=got[:, 0].long(), affinity_P=got[:, 1], protected_P=got[:, 2].bool(),
                            token_P=got[:, 3].long(), slot_P=got[:, 4].long())
        keep_back = _exchange(rule(received).to(torch.uint8), recv, send, self.group)
        keep_P = torch.empty_like(keep_back)
        keep_P[order_P] = keep_back
        return keep_P.bool()

    def __call__(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 keys: Optional[PairKeys], rule: Optional[DropRule], experts,
                 overlap: Optional[Callable[[], torch.Tensor]] = None) -> DispatchResult:
        T, K = topk_idx_TK.shape
        D, per_rank = self.ep_size, self.experts_per_rank
        dest_TK = topk_idx_TK // per_rank
        if rule is not None:
            keep_TK = self._decide_keep(keys, rule, dest_TK.flatten()).view(T, K)
        else:
            keep_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)

        # 1. one row per (token, destination) holding at least one kept pair.
        dest_kept_TK = torch.where(keep_TK, dest_TK, torch.full_like(dest_TK, D))
        hit_TD = torch.zeros(T, D + 1, dtype=torch.bool, device=x_TH.device)
        hit_TD = hit_TD.scatter_(1, dest_kept_TK, True)[:, :D]
        dest_R, token_R = hit_TD.t().nonzero(as_tuple=True)
        slot_match_RK = dest_kept_TK[token_R] == dest_R[:, None]
        local_expert_RK = torch.where(slot_match_RK, topk_idx_TK[token_R] - dest_R[:, None] * per_rank,
                                      torch.full_like(slot_match_RK, -1, dtype=torch.long))
        weight_RK = topk_weight_TK[token_R] * slot_match_RK

        # 2. counts first.
        send_D = hit_TD.sum(0)
        recv_D = _exchange_counts(send_D, self.group)
        send, recv = send_D.tolist(), recv_D.tolist()

        # 3. rows and routing rows; shared experts meanwhile.
        x_recv = all_to_all_single_autograd(x_TH[token_R], recv, send, self.group)
        route_RK2 = torch.cat([weight_RK, local_expert_RK.to(weight_RK.dtype)], dim=1)
        route_recv = all_to_all_single_autograd(route_RK2, recv, send, self.group)
        overlap_out = overlap() if (overlap is not None and self.overlap) else None

        # 4. expand to (row, local expert), run the experts, weight, sum per row. The received
        # buffers become plain tensors here (kernels read their data pointers), keeping autograd.
        x_recv, route_recv = wait_tensor(x_recv), wait_tensor(route_recv)
        local_expert_SK = route_recv[:, K:].detach().long()
        src_S, slot_S = (local_expert_SK >= 0).nonzero(as_tuple=True)
        y_recv = apply_experts(x_recv, src_S, local_expert_SK[src_S, slot_S],
                               route_recv[:, :K][src_S, slot_S], experts)

        # 5. combine.
        y_back = all_to_all_single_autograd(y_recv, send, recv, self.group)
        if overlap is not None and not self.overlap:
            overlap_out = overlap()
        y_TH = torch.zeros_like(x_TH).index_add_(0, token_R, y_back)

        dest_per_token_T = hit_TD.sum(1)
        row_bytes = x_TH.shape[1] * x_TH.element_size()
        traffic = {
            "rows_sent": send_D.sum(), "rows_received": recv_D.sum(),
            "bytes_sent": send_D.sum() * row_bytes, "bytes_received": recv_D.sum() * row_bytes,
            "dest_ranks_per_token_mean": dest_per_token_T.float().mean() if T else torch.zeros(()),
            "dest_ranks_per_token_max": dest_per_token_T.max() if T else torch.zeros((), dtype=torch.long),
        }
        processed = torch.tensor(src_S.numel(), device=x_TH.device)
        return DispatchResult(y_TH, keep_TK, overlap_out, processed, traffic)
