"""Expert activations, their derivatives, and the backward through ``scale * act(h)``.

    swiglu: a = silu(g) * u      with h = [g | u] (gate half first, as DeepSeek and transformers)
    gelu:   a = gelu(h)          exact, erf form

Shared by every expert backend (moe_ep/expert_backend.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "gelu")
_DOT_CHUNK_ELEMENTS = 1 << 22  # products of at most 16 MiB (fp32) alive at once


def activate(h_RJ: torch.Tensor, activation: str, overwrite: bool = False) -> torch.Tensor:
    """SwiGLU on ``[gate | up]`` halves, or exact GELU. ``overwrite``: ``h`` is not needed afterwards; GELU
    then writes its result over ``h`` (no second ``[R, I]`` buffer, which on CPU is fresh, page-faulted
    memory once it is large), SwiGLU still returns a new ``[R, I]``."""
    if activation == "swiglu":
        gate, up = h_RJ.chunk(2, dim=-1)
        return F.silu(gate) * up
    return torch.ops.aten.gelu_(h_RJ) if overwrite else F.gelu(h_RJ)


def activation_grad(h_RJ: torch.Tensor, da_RI: torch.Tensor, activation: str,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dL/dh`` from ``dL/da`` for ``a = act(h)``, in ``h``'s dtype, as autograd computes it.

    SwiGLU: ``dg = silu'(g) * (da * u)``, ``du = da * silu(g)``; GELU:
    ``gelu'(h) * da``. ``silu_backward`` and ``gelu_backward`` evaluate the
    derivative in fp32 inside the kernel for bf16 and fp16 inputs, so no
    fp32 copy of the rows is made. The result goes into ``out`` (shaped like
    ``h``) when given; otherwise GELU writes it over ``da_RI`` (J = I) and the
    caller must not read ``da_RI`` afterwards.
    """
    if activation == "swiglu":
        gate, up = h_RJ.chunk(2, dim=-1)
        dh_RJ = torch.empty_like(h_RJ) if out is None else out
        d_gate, d_up = dh_RJ.chunk(2, dim=-1)
        d_gate.copy_(torch.ops.aten.silu_backward(da_RI * up, gate))
        torch.mul(da_RI, F.silu(gate), out=d_up)
        return dh_RJ
    return torch.ops.aten.gelu_backward.grad_input(da_RI, h_RJ, grad_input=da_RI if out is None else out)


def row_dots(a_RI: torch.Tensor, b_RI: torch.Tensor, out: Optional[torch.Tensor] = None,
             chunk_elements: Optional[int] = None) -> torch.Tensor:
    """``<a_r, b_r>`` for every row, in chunks of rows so the product temporary stays small (at most
    ``_DOT_CHUNK_ELEMENTS``, or ``chunk_elements`` when smaller)."""
    limit = _DOT_CHUNK_ELEMENTS if chunk_elements is None else min(chunk_elements, _DOT_CHUNK_ELEMENTS)
    rows = max(1, limit // max(1, a_RI.shape[1]))
    dots_R = a_RI.new_empty(a_RI.shape[0]) if out is None else out
    for a, b, dots in zip(a_RI.split(rows), b_RI.split(rows), dots_R.split(rows)):
        torch.sum(a * b, dim=1, out=dots)
    return dots_R


def scaled_activation(h_RJ: torch.Tensor, da_RI: torch.Tensor, scale_R1: torch.Tensor, activation: str,
                      d_weight_R: Optional[torch.Tensor], dot_chunk_elements: Optional[int] = None) -> torch.Tensor:
    """First half of the backward of ``a = scale * act(h)`` from ``da~ = dL/da``: returns ``scale * act(h)``.

    Writes ``d scale_r = <da~_r, act(h_r)>`` into ``d_weight_R`` when given
    (``row_dots``, in chunks of at most ``dot_chunk_elements``).
    The second half is ``activation_grad(h, da~ * scale)``; between the two
    the caller takes the weight gradient of the next product from the
    returned rows and frees them, so ``h``, ``da~`` and the activation are the
    most rows alive at once.
    """
    act_RI = activate(h_RJ, activation)
    if d_weight_R is not None:
        row_dots(da_RI, act_RI, out=d_weight_R, chunk_elements=dot_chunk_elements)
    return act_RI.mul_(scale_R1)
