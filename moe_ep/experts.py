"""Expert FFNs: stacked routed experts and the always-active shared experts.

Routed experts are two stacked parameters (never a ModuleList of Linears):

    w_in  [E, H, J]   J = 2I for SwiGLU (first I columns gate, next I up), I for GELU
    w_out [E, I, H]

    SwiGLU: y = (silu(x w_gate) * (x w_up)) w_out      (DeepSeek)
    GELU:   y = gelu(x w_in) w_out                      (classic MoE)

The layout is [E, in, out] so a projection is ``x @ w[e]``; transformers
stores [E, out, in] (see ``moe_ep.interop``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import half_matmul
from .activations import activate
from .config import MoEConfig
from .expert_ffn import SharedWeightGrads, expert_ffn


class RoutedExperts(nn.Module):
    """``num_local_experts`` experts of width I, applied to gathered, expert-sorted rows.

    ``recompute`` (``MoEConfig.recompute_experts``): keep no pre-activations
    for backward and recompute them there (activation checkpointing of the
    routed experts only).
    """

    def __init__(self, config: MoEConfig, num_local_experts: int):
        super().__init__()
        H, I = config.hidden_size, config.moe_intermediate_size
        J = 2 * I if config.activation == "swiglu" else I
        self.activation = config.activation
        self.backend = config.expert_backend
        self.recompute = config.recompute_experts
        self.num_local_experts = num_local_experts
        self.w_in = nn.Parameter(torch.empty(num_local_experts, H, J))
        self.w_out = nn.Parameter(torch.empty(num_local_experts, I, H))
        nn.init.normal_(self.w_in, std=H ** -0.5)
        nn.init.normal_(self.w_out, std=I ** -0.5)

    def forward(self, x_SH: torch.Tensor, row_R: torch.Tensor, counts_E: torch.Tensor,
                weight_R: torch.Tensor, shared_grads: Optional[SharedWeightGrads] = None) -> torch.Tensor:
        """``y_S[s] = sum_{r : row_R[r] = s} weight_R[r] * FFN_{e(r)}(x_S[s])`` (``moe_ep.expert_ffn``).

        ``row_R`` lists the source row of each (row, expert) pair sorted by
        local expert, ``counts_E`` pairs per expert; returns ``[S, H]``.
        ``shared_grads``: one weight gradient for this call and the others
        sharing it (the overlap chunks of one layer call; ``share_weight_grads``).
        """
        if shared_grads is not None:
            w_in, w_out = shared_grads.w_in, shared_grads.w_out
        else:
            w_in, w_out = self.w_in.to(x_SH.dtype), self.w_out.to(x_SH.dtype)
        return expert_ffn(x_SH, row_R, counts_E, weight_R, w_in, w_out, self.activation, self.backend,
                          self.recompute, shared_grads)

    def share_weight_grads(self, dtype: torch.dtype) -> Optional[SharedWeightGrads]:
        """The weights in ``dtype`` for several calls that take one weight gradient (``SharedWeightGrads``: the
        overlap chunks of one layer call, created where the dispatcher has sent every chunk); None when no
        weight gradient will be taken (grad mode off, or frozen weights)."""
        if not (torch.is_grad_enabled() and (self.w_in.requires_grad or self.w_out.requires_grad)):
            return None
        return SharedWeightGrads(self.w_in.to(dtype), self.w_out.to(dtype))

    def padded(self, x_ENH: torch.Tensor) -> torch.Tensor:
        """``y_EN = act(x_EN W_in[e]) W_out[e]``: N rows of every local expert, as batched matmuls, no gate weight.

        The sync-free dispatcher's experts (``moe_ep.dispatch.padded``): its buffers hold a fixed number of
        slots per expert, empty ones zero (and ``act(0) = 0``, so they stay zero). Plain differentiable ops:
        autograd, or ``torch.compile``, makes the backward.
        """
        h_ENJ = torch.bmm(x_ENH, self.w_in.to(x_ENH.dtype))
        return torch.bmm(activate(h_ENJ, self.activation), self.w_out.to(x_ENH.dtype))


class SharedExperts(nn.Module):
    """N_s shared experts fused into one dense FFN of width N_s * I_shared.

    Parameter names follow transformers' ``DeepseekV2MLP`` (``gate_proj``,
    ``up_proj``, ``down_proj``); GELU has no ``gate_proj``.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        H, W = config.hidden_size, config.shared_width
        self.activation = config.activation
        self.gate_proj = nn.Linear(H, W, bias=False) if config.activation == "swiglu" else None
        self.up_proj = nn.Linear(H, W, bias=False)
        self.down_proj = nn.Linear(W, H, bias=False)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The FFN in x's dtype (the weights are cast to it, as the routed experts' are; ``half_matmul``: the
        products in float32 for half dtypes on a CPU without a half matmul)."""
        def proj(linear: nn.Linear, h: torch.Tensor) -> torch.Tensor:
            return half_matmul.linear(h, linear.weight.to(h.dtype))

        if self.gate_proj is not None:
            h = F.silu(proj(self.gate_proj, x_TH)) * proj(self.up_proj, x_TH)
        else:
            h = F.gelu(proj(self.up_proj, x_TH))
        return proj(self.down_proj, h)
