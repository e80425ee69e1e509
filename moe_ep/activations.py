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
    """``dL/dh`` from ``dL/da`` for ``a = act(h)``, in ``h``'s dtype, as autograd computes it.

    SwiGLU: ``dg = silu'(g) * (da * u)``, ``du = da * silu(g)``; GELU:
    ``gelu'(h) * da``. ``silu_backward`` and ``gelu_backward`` evaluate the
    derivative in fp32 inside the kernel for bf16 and fp16 inputs, so no
    fp32 copy of the ``[R, J]`` rows is made. GELU writes the result over
    ``da_RI`` (J = I): the caller must not read ``da_RI`` afterwards.
    """
    if activation == "swiglu":
        gate, up = h_RJ.chunk(2, dim=-1)
        dh_RJ = torch.empty_like(h_RJ)
        d_gate, d_up = dh_RJ.chunk(2, dim=-1)
        d_gate.copy_(torch.ops.aten.silu_backward(da_RI * up, gate))
        torch.mul(da_RI, F.silu(gate), out=d_up)
        return dh_RJ
    return torch.ops.aten.gelu_backward.grad_input(da_RI, h_RJ, grad_input=da_RI)
