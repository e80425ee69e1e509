"""The textbook capacity-limited MoE: the baseline every runtime should beat.

It is the layer a reader writes after the seed document's hand-written MoE
(softmax gate, top-k, per-expert capacity, a Python loop over a ModuleList
of experts, ``index_add``), here without biases and without the seed's
prints and auxiliary losses:

    p_TE = softmax(x_TH W_g^T)                     (fp32, or fp64 for fp64 input)
    g_TK, e_TK = topk(p_TE, K)                     (raw probabilities, not renormalised)
    C = ceil(cf * T * K / E)                       (per-expert capacity)
    for each expert e:
        P_e = tokens t with e in e_TK[t], ascending t; keep the first C
        y[P_e] += g[P_e, e] * FFN_e(x[P_e])         (index_add)
    FFN_e(x) = gelu(x W1_e^T) W2_e^T

Pairs beyond the capacity of their expert are dropped in token order (the
earliest tokens win); a token whose pairs are all dropped gets y = 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def gelu_ffn(hidden: int, width: int) -> nn.Sequential:
    """``gelu(x W1^T) W2^T`` without biases: one expert (or one dense FFN) of the benchmark."""
    return nn.Sequential(nn.Linear(hidden, width, bias=False), nn.GELU(), nn.Linear(width, hidden, bias=False))


class TextbookMoE(nn.Module):
    """Softmax top-k MoE with a per-expert capacity and one Python iteration per expert."""

    def __init__(self, hidden: int, ffn: int, n_experts: int, top_k: int, capacity_factor: float):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"TextbookMoE: top_k={top_k} must lie in [1, n_experts={n_experts}]")
        if not capacity_factor > 0:
            raise ValueError(f"TextbookMoE: capacity_factor must be positive, got {capacity_factor}")
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(gelu_ffn(hidden, ffn) for _ in range(n_experts))

    def capacity(self, n_tokens: int) -> int:
        """``ceil(cf * T * K / E)`` pairs per expert."""
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / len(self.experts))

    def route(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_TK, e_TK): the top-k softmax probabilities and their experts."""
        logits_TE = self.gate(x_TH)
        probs_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)).softmax(dim=-1)
        return probs_TE.topk(self.top_k, dim=-1)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        if x_TH.dim() != 2:
            raise ValueError(f"TextbookMoE: expected x [T, H], got {tuple(x_TH.shape)}")
        T = x_TH.shape[0]
        gate_TK, expert_TK = self.route(x_TH)
        cap = self.capacity(T)
        token_P = torch.arange(T, device=x_TH.device).repeat_interleave(self.top_k)  # token-major pairs
        expert_P, gate_P = expert_TK.flatten(), gate_TK.flatten()
        y_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            mine = expert_P == e
            tokens = token_P[mine][:cap]
            if tokens.numel() == 0:
                continue
            weights = gate_P[mine][:cap].to(x_TH.dtype)
            y_TH.index_add_(0, tokens, expert(x_TH[tokens]) * weights[:, None])
        return y_TH

    @torch.no_grad()
    def dropped_fraction(self, x_TH: torch.Tensor) -> float:
        """Share of the T*K pairs beyond their expert's capacity for this input."""
        _, expert_TK = self.route(x_TH)
        load_E = torch.bincount(expert_TK.flatten(), minlength=len(self.experts))
        return float((load_E - self.capacity(x_TH.shape[0])).clamp_min(0).sum()) / expert_TK.numel()
