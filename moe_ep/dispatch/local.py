"""Single-process dispatch: sort pairs by expert, run the experts, scatter back.

    rows   = kept (token, expert) pairs, stably sorted by expert
    y_rows = experts(x[token(rows)], counts) * g(rows)
    y_T    = sum over each token's rows            (index_add)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..dropping import DropRule, PairKeys


@dataclass
class DispatchResult:
    """y_TH: routed output; keep_TK: which of this rank's pairs were kept;
    overlap_out: the result of the callable run while tokens were in flight;
    processed_pairs: (row, expert) pairs this rank's experts computed (0-d
    int64), counted where the experts run, independently of ``keep_TK``;
    traffic: per-rank message sizes (empty on one process)."""

    y_TH: torch.Tensor
    keep_TK: torch.Tensor
    overlap_out: Optional[torch.Tensor]
    processed_pairs: torch.Tensor
    traffic: dict = field(default_factory=dict)


def apply_experts(x_SH: torch.Tensor, src_R: torch.Tensor, expert_R: torch.Tensor, weight_R: torch.Tensor,
                  experts) -> torch.Tensor:
    """Weighted expert outputs summed per source row.

        y_S[s] = sum_{r : src_R[r] = s} FFN_{expert_R[r]}(x_S[s]) * weight_R[r]

    The pairs are stably sorted by (local) expert; the experts read their rows
    of ``x_SH`` through that index (no gathered copy is kept for backward).
    """
    order_R = torch.argsort(expert_R, stable=True)
    counts_E = torch.bincount(expert_R, minlength=experts.num_local_experts)
    return experts(x_SH, src_R[order_R], counts_E, weight_R[order_R])


class LocalDispatcher:
    """All experts on this process; the reference for every distributed layout."""

    def __call__(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 keys: Optional[PairKeys], rule: Optional[DropRule], experts,
                 overlap: Optional[Callable[[], torch.Tensor]] = None) -> DispatchResult:
        T, K = topk_idx_TK.shape
        if rule is not None:
            keep_TK = rule(keys).view(T, K)
        else:
            keep_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)
        overlap_out = overlap() if overlap is not None else None
        token_R, slot_R = keep_TK.nonzero(as_tuple=True)
        y_TH = apply_experts(x_TH, token_R, topk_idx_TK[token_R, slot_R], topk_weight_TK[token_R, slot_R],
                             experts)
        processed = torch.tensor(token_R.numel(), device=x_TH.device)
        return DispatchResult(y_TH, keep_TK, overlap_out, processed)
