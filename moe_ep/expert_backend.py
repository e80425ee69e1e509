"""One grouped matmul for every expert projection, with three backends.

    grouped_matmul(x_RK, w_EKN, counts_E)[r] = x_RK[r] @ w_EKN[e(r)]

where rows are sorted by expert and expert e owns ``counts_E[e]`` consecutive
rows. Backends:

* ``triton``: ``moe_ep.kernels.grouped_mm`` (CUDA; the interpreter on CPU);
* ``torch``: ``torch._grouped_mm`` (fp32/fp16/bf16, 16-byte aligned strides);
* ``loop``: one matmul per contiguous segment; needs the counts on the host.

``auto`` picks Triton on CUDA, torch on CPU when the dtype and strides allow,
and the loop otherwise.
"""
from __future__ import annotations

import torch

_GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded gradients (e.g. from
    ``y.sum()``), which have zero strides.
    """

    @staticmethod
    def forward(ctx, y):
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _torch_grouped_mm_ok(x_RK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    if x_RK.dtype not in _GROUPED_MM_DTYPES or w_EKN.dtype != x_RK.dtype:
        return False
    size = x_RK.element_size()
    # Unit strides are fine; every other stride (and the output row) must be 16-byte aligned.
    return all(s == 1 or (s * size) % 16 == 0
               for s in (x_RK.stride(0), w_EKN.stride(1), w_EKN.stride(2), w_EKN.shape[-1]))


def resolve_backend(requested: str, x_RK: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """The backend ``grouped_matmul`` will use for these operands."""
    if requested in ("auto", "torch") and x_RK.shape[0] == 0:
        return "loop"  # torch._grouped_mm's backward rejects empty operands
    if requested != "auto":
        return requested
    if x_RK.is_cuda:
        from .kernels import triton_available
        if triton_available():
            return "triton"
    if _torch_grouped_mm_ok(x_RK, w_EKN):
        return "torch"
    return "loop"


def _loop_grouped_mm(x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    segments = torch.split(x_RK, counts_E.tolist())
    outs = [seg @ w_EKN[e] for e, seg in enumerate(segments)]
    if not outs:
        return x_RK.new_zeros(0, w_EKN.shape[-1])
    return torch.cat(outs)


def grouped_matmul(x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """``[R, K] x [E, K, N] -> [R, N]``, each expert's rows times its weight."""
    if x_RK.shape[-1] != w_EKN.shape[1]:
        raise ValueError(f"grouped_matmul: x has K={x_RK.shape[-1]} but w has K={w_EKN.shape[1]}")
    if counts_E.numel() != w_EKN.shape[0]:
        raise ValueError(f"grouped_matmul: {counts_E.numel()} counts for {w_EKN.shape[0]} experts")
    chosen = resolve_backend(backend, x_RK, w_EKN)
    if chosen == "triton":
        from .kernels import grouped_mm
        return grouped_mm(x_RK, w_EKN, counts_E)
    if chosen == "torch":
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_RK, w_EKN, offs=offs_E))
    if chosen == "loop":
        return _loop_grouped_mm(x_RK, w_EKN, counts_E)
    raise ValueError(f"grouped_matmul: unknown backend {backend!r}")
