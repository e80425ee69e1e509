"""Half-precision matrix products on CPUs without a fast path for them.

torch multiplies bfloat16 and float16 on CPU through oneDNN where the CPU has
the instructions for it (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` /
``_is_mkldnn_fp16_supported()``: AVX-512 or AMX). Elsewhere, on AVX2 machines
such as this project's CI, ``torch.mm`` falls back to a scalar loop: a
``[500, 512] x [512, 1024]`` bf16 product took 23-460 ms there depending on
which operand is transposed, against 7 ms for the same product in float32
with the casts (docs/performance.md, "bf16 on a CPU without bf16 matmul").

On such a CPU the functions below multiply in float32 and round the result
to the operands' dtype once, which is what the fallback computes too (it
accumulates in float32): the same products up to the order of the float32
sums. Everywhere else (CUDA, float32, CPUs with oneDNN's half path) they are
the plain torch calls.

    mm_into(a, b, out)   out = a @ b
    addmm_(out, a, b)    out += a @ b
    linear(x, w)         x @ w^T as the caller's autocast computes it, differentiable
    Linear               nn.Linear whose product is ``linear`` (same parameters and state dict)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .precision import autocast_off, compute_dtype

_ONEDNN_CHECKS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@functools.lru_cache(maxsize=None)
def _cpu_lacks_half_matmul(dtype: torch.dtype) -> bool:
    check = getattr(torch.ops.mkldnn, _ONEDNN_CHECKS[dtype], None)
    return check is None or not check()


def _upcast_dtype(device_type: str, dtype: torch.dtype) -> bool:
    return device_type == "cpu" and dtype in _ONEDNN_CHECKS and _cpu_lacks_half_matmul(dtype)


def upcast(t: torch.Tensor) -> bool:
    """True when products of ``t``'s dtype on its device are computed in float32 here (the module docstring)."""
    return _upcast_dtype(t.device.type, t.dtype)


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` (2-D, any strides of ``a`` and ``b``)."""
    if upcast(a):
        return out.copy_(torch.mm(a.float(), b.float()))
    return torch.mm(a, b, out=out)


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` in place."""
    if upcast(a):
        return out.add_(torch.mm(a.float(), b.float()))
    return out.addmm_(a, b)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) in the dtype torch would compute it in: the autocast dtype of x's device when
    autocast is on there, else x's. When that dtype is upcast here, the operands are rounded to it, multiplied
    in float32 with autocast off, and the result rounded to it once; autograd's backward products are float32
    and its gradients pass the same roundings, as autocast's would."""
    dtype = compute_dtype(x)
    if not _upcast_dtype(x.device.type, dtype):
        return F.linear(x, w)
    with autocast_off(x.device.type):
        return F.linear(x.to(dtype).float(), w.to(dtype).float()).to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` whose product is ``linear`` (so fast on CPUs without a half matmul); same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)
