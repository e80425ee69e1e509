"""Expert activations and their derivatives (shared by every expert backend).

    swiglu: a = silu(g) * u      with h = [g | u] (gate half first, as DeepSeek and transformers)
    gelu:   a = gelu(h)          exact, erf form
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "gelu")


def activate(h_RJ: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU on ``[gate | up]`` halves, or exact GELU."""
    if activation == "swiglu":
        gate, up = h_RJ.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_RJ)


def activation_grad(h_RJ: torch.Tensor, da_RI: torch.Tensor, activation: str) -> torch.Tensor:
    """``dL/dh`` from ``dL/da`` for ``a = act(h)``, computed in fp32, returned in ``h``'s dtype.

    SwiGLU: ``dg = da * u * s * (1 + g (1 - s))`` with ``s = sigmoid(g)``, ``du = da * silu(g)``.
    """
    h32, da32 = h_RJ.float(), da_RI.float()
    if activation == "swiglu":
        gate, up = h32.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        d_gate = da32 * up * sig * (1 + gate * (1 - sig))
        d_up = da32 * gate * sig
        return torch.cat([d_gate, d_up], dim=-1).to(h_RJ.dtype)
    return torch.ops.aten.gelu_backward(da32, h32).to(h_RJ.dtype)
