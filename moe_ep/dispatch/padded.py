"""The sync-free dispatcher (``MoEConfig.sync_free``): capacity-padded buffers, counts that stay on the device.

Every buffer has a shape fixed by the token count and the expert capacity, so the layer reads nothing on the
host in forward or backward (a GPU stream never waits for the host, a CUDA graph can capture the layer) and
``torch.compile`` traces the layer as one graph (``fullgraph=True``).

Capacity, per sender (as GShard and DeepSpeed): each rank lets at most

    C = ceil(cf * T * K / E)        cf: the expert capacity factor in force, T: this rank's tokens

of its own pairs reach each expert. The keep decision is this rank's ``DropRule`` on its own pairs (the
expert capacity, then the device capacity when set, ranked by ``drop_policy``, protected sequences first), so
no ranking keys travel. A kept pair takes the next free slot of its expert, protected pairs first, in pair
order; a protected pair beyond the C slots (protection cannot grow a static buffer) overflows and is dropped
like any other (``padded_slots``). Every dropped pair is counted on the device: ``keep_TK`` is what was sent,
and the experts' ranks count what they received (``processed_pairs``, from the exchanged fill counts), so
``processed + dropped == routed``.

Buffers of one rank (D = EP size, E_l = E / D local experts, slot (d, l, c) = the c-th pair of this rank
for expert ``d * E_l + l``; an empty slot is a zero row):

    sent       x_S  [D * E_l * C, H]     rows of this rank's pairs in their slots
    received        [D * E_l * C, H]     from each sender its [E_l, C] slots of this rank's experts
    experts         [E_l, D * C, H]      batched matmuls over every slot (``RoutedExperts.padded``)
    returned   y_S  [D * E_l * C, H]     the unweighted results of this rank's slots
    combined   y_t = sum_k g_tk * y_S[slot(t, k)]        (a dropped pair reads a zero row)

The gate values never travel: they weight the results on the token's own rank.

Collectives, in this order on every rank: the fill counts ``[D, E_l]``, the rows, the results (all-to-alls
of equal splits over the EP group), then the layer's statistics all-reduces. Eager runs them through c10d
(``exchange.RowExchange``, as the default dispatcher: no ``torch._dynamo`` import, docs/reliability.md);
under ``torch.compile`` through ``torch.distributed._functional_collectives``, whose all-to-all dynamo traces
and differentiates (c10d's asynchronous calls it cannot trace) and which only adds an import that compiling
has already made.

Every rank of the EP group must pass the same number of tokens: C, and with it every buffer's shape, derive
from it (as in DeepSpeed). The layer's agreement all-gather (a host read) is skipped, so nothing checks this.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..dropping import DropRule, PairKeys, capacity
from ..parallel.links import LinkRoute
from ..parallel.state import ParallelState
from ..router import destination_hits
from .exchange import RowExchange, ep_link_route
from .rows import DispatchResult, traffic


def padded_slots(expert_P: torch.Tensor, keep_P: torch.Tensor, protected_P: torch.Tensor, slots: int,
                 n_experts: int) -> torch.Tensor:
    """The slot ``e * slots + c`` of every pair (its expert e, its place c among e's kept pairs), or
    ``n_experts * slots`` for a pair that is dropped or overflows.

    Among an expert's kept pairs the protected come first, then pair order: a stable sort on
    ``(expert, dropped, unprotected)``; c is the pair's position in its expert's run of that order.
    """
    P = expert_P.numel()
    key_P = expert_P * 4 + (~keep_P).long() * 2 + (~protected_P).long()
    perm_P = torch.argsort(key_P, stable=True)
    sorted_expert_P = expert_P[perm_P]
    place_sorted_P = torch.arange(P, device=expert_P.device) - torch.searchsorted(sorted_expert_P, sorted_expert_P)
    place_P = torch.empty_like(place_sorted_P).scatter_(0, perm_P, place_sorted_P)
    fits_P = keep_P & (place_P < slots)
    return torch.where(fits_P, expert_P * slots + place_P, torch.full_like(expert_P, n_experts * slots))


class _EqualExchange:
    """One all-to-all of equal splits over ``group``, differentiable, issued and awaited apart (module docstring:
    c10d when eager, functional collectives under ``torch.compile``)."""

    def __init__(self, group: dist.ProcessGroup, n_ranks: int, route: LinkRoute, label: str):
        self.group, self.n_ranks, self.route, self.label = group, n_ranks, route, label
        self._c10d: Optional[RowExchange] = None

    def issue(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            from torch.distributed import _functional_collectives as funcol
            return funcol.all_to_all_single(x.contiguous(), None, None, self.group)
        split = [x.shape[0] // self.n_ranks] * self.n_ranks
        self._c10d = RowExchange(split, split, self.group, self.route, self.label)
        return self._c10d.issue(x)

    def wait(self, pending: torch.Tensor) -> torch.Tensor:
        return pending if self._c10d is None else self._c10d.wait(pending)


class PaddedDispatcher:
    """Capacity-padded dispatch over the EP group without host reads (module docstring).

    ``overlap_shared``: run ``side_work`` while the rows are in flight (else after the combine).
    """

    kind = "padded"

    def __init__(self, parallel: ParallelState, n_experts: int, overlap_shared: bool = True):
        self.parallel = parallel
        self.n_experts = n_experts
        self.overlap_shared = overlap_shared
        self.route = ep_link_route(parallel)

    def _exchange(self, label: str) -> Optional[_EqualExchange]:
        """An all-to-all over the EP group; None on one EP rank (the buffers stay where they are)."""
        if self.parallel.ep_size == 1:
            return None
        return _EqualExchange(self.parallel.ep_group, self.parallel.ep_size, self.route, label)

    def __call__(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 keys: Optional[PairKeys], rule: Optional[DropRule], experts,
                 side_work: Optional[Callable[[], torch.Tensor]] = None) -> DispatchResult:
        if rule is None or rule.expert_cf is None:
            raise ValueError("PaddedDispatcher: needs an expert capacity in force (MoEConfig.sync_free requires "
                             "expert_capacity_factor)")
        T, K = topk_idx_TK.shape
        H = x_TH.shape[1]
        D, E = self.parallel.ep_size, self.n_experts
        E_l = E // D
        C = capacity(rule.expert_cf, rule.n_tokens, K, E)
        expert_P = topk_idx_TK.flatten()
        slot_P = padded_slots(expert_P, rule(keys), keys.protected_P, C, E)
        keep_P = slot_P < E * C
        fill_E = torch.zeros(E, dtype=torch.long, device=x_TH.device).scatter_add_(0, expert_P, keep_P.long())
        token_P = torch.arange(T, device=x_TH.device).repeat_interleave(K)
        src_S = torch.full((E * C + 1,), T, dtype=torch.long, device=x_TH.device).scatter_(0, slot_P, token_P)[:-1]
        side_out = None
        with record_function("moe_ep.dispatch"):
            x_SH = torch.cat([x_TH, x_TH.new_zeros(1, H)]).index_select(0, src_S)  # an empty slot reads the zero row
            counts, rows = self._exchange("counts"), self._exchange("padded.dispatch")
            if rows is not None:
                fill_E = counts.wait(counts.issue(fill_E))
                pending = rows.issue(x_SH)
                if side_work is not None and self.overlap_shared:
                    side_out = side_work()
                x_SH = rows.wait(pending)
        y_LNH = experts.padded(x_SH.view(D, E_l, C, H).transpose(0, 1).reshape(E_l, D * C, H))
        with record_function("moe_ep.combine"):
            y_SH = y_LNH.view(E_l, D, C, H).transpose(0, 1).reshape(D * E_l * C, H)
            back = self._exchange("padded.combine")
            if back is not None:
                y_SH = back.wait(back.issue(y_SH))
            y_TKH = torch.cat([y_SH, y_SH.new_zeros(1, H)]).index_select(0, slot_P).view(T, K, H)
            y_TH = torch.bmm(topk_weight_TK.to(y_TKH.dtype).unsqueeze(1), y_TKH).squeeze(1)
        if side_work is not None and side_out is None:
            side_out = side_work()
        keep_TK = keep_P.view(T, K)
        dest_ranks_T = destination_hits(torch.where(keep_TK, topk_idx_TK // E_l, torch.full_like(topk_idx_TK, D)),
                                        D).sum(1)
        return DispatchResult(y_TH, keep_TK, side_out, fill_E.sum(), self._traffic(E_l * C, H * x_TH.element_size(),
                                                                                  dest_ranks_T))

    def _traffic(self, rows_per_rank: int, row_bytes: int, dest_ranks_T: torch.Tensor) -> dict:
        """Every slot moves, padding included: ``E_l * C`` rows to and from each EP rank."""
        if self.parallel.ep_size == 1:
            return {}
        same_node_D = self.route.same_node_D
        rows = lambda n: torch.full((), n * rows_per_rank, device=dest_ranks_T.device)  # noqa: E731  (no host copy)
        return traffic(rows(len(same_node_D)), rows(len(same_node_D)), rows(same_node_D.count(False)),
                       rows(same_node_D.count(True) - 1), row_bytes, dest_ranks_T)
