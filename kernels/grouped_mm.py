"""grouped_mm: multiply each expert's block of expert-sorted rows by that expert's weight.

    out[r] = x[r] @ w[e(r)],   e(r) = the expert whose row range [cumsum(counts)[e] - counts[e],
                                       cumsum(counts)[e]) contains r

Always runs the Triton kernel (``grouped_gemm_triton``). Differentiable:

    dX = grouped_mm(dY, w.transpose(1, 2), counts)      (same kernel, transposed view)
    dW[e] = x[rows_e]^T @ dY[rows_e]                     (weight-gradient kernel; 0 for empty experts)
"""
import torch
from torch.autograd.function import once_differentiable

from .block_table import BlockConfig, choose_config, choose_weight_grad_config
from .launchers import triton_launchers

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels multiply (accumulating in fp32)


def check_counts(counts: torch.Tensor, num_experts: int, device: torch.device) -> None:
    """``counts`` must be an integer [E] tensor on the operands' device (its sum is not read)."""
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must have shape ({num_experts},), got {tuple(counts.shape)}")
    if counts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"counts must be int32 or int64, got {counts.dtype}")
    if counts.device != device:
        raise ValueError(f"counts is on {counts.device} but the operands are on {device}")


def _check_operands(x_TK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> None:
    if x_TK.dim() != 2 or w_EKN.dim() != 3 or x_TK.shape[1] != w_EKN.shape[1]:
        raise ValueError(f"expected x [T, K] and w [E, K, N], got {tuple(x_TK.shape)} and {tuple(w_EKN.shape)}")
    if x_TK.dtype not in DTYPES or w_EKN.dtype != x_TK.dtype:
        raise TypeError(f"x and w must share one of {DTYPES}, got {x_TK.dtype} and {w_EKN.dtype}")
    if w_EKN.device != x_TK.device:
        raise ValueError(f"x is on {x_TK.device} but w is on {w_EKN.device}")
    check_counts(counts_E, w_EKN.shape[0], x_TK.device)


def grouped_gemm(x_TK, w_EKN, counts_E, config=None, out=None):
    """``out[r] = x[r] @ w[e(r)]`` without autograd, into ``out`` [T, N] or a new tensor in x's dtype."""
    num_rows, (num_experts, k, n) = x_TK.shape[0], w_EKN.shape
    config = config or choose_config(num_rows, num_experts, k, n, x_TK.dtype)
    out_TN = x_TK.new_empty((num_rows, n)) if out is None else out
    return triton_launchers().launch_grouped_gemm(x_TK, w_EKN, counts_E, out_TN, config)


def weight_grad(x_TK, dy_TN, counts_E, like_EKN=None, config=None):
    """``dW[e] = x[rows_e]^T @ dy[rows_e]`` (no autograd): a new [E, K, N] tensor.

    Shaped and strided like ``like_EKN`` when given, else contiguous in x's dtype.
    """
    if like_EKN is None:
        like_EKN = x_TK.new_empty((counts_E.shape[0], x_TK.shape[1], dy_TN.shape[1]))
    num_experts, k, n = like_EKN.shape
    config = config or choose_weight_grad_config(x_TK.shape[0], num_experts, k, n, x_TK.dtype)
    return triton_launchers().launch_weight_grad(x_TK, dy_TN, counts_E, torch.empty_like(like_EKN), config)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK, w_EKN, counts_E, config):
        ctx.save_for_backward(x_TK, w_EKN, counts_E)
        ctx.config = config
        return grouped_gemm(x_TK, w_EKN, counts_E, config)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TN):
        x_TK, w_EKN, counts_E = ctx.saved_tensors
        dx_TK = dw_EKN = None
        if ctx.needs_input_grad[0]:
            dx_TK = grouped_gemm(dy_TN, w_EKN.transpose(1, 2), counts_E, ctx.config)
        if ctx.needs_input_grad[1]:
            dw_EKN = weight_grad(x_TK, dy_TN, counts_E, w_EKN, ctx.config)
        return dx_TK, dw_EKN, None, None


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, *,
               config: BlockConfig | None = None) -> torch.Tensor:
    """Grouped matrix multiply of expert-sorted rows; returns [T, N] in x's dtype.

    Args:
        x_TK: [T, K] rows sorted by expert (expert 0's rows first), any strides.
        w_EKN: [E, K, N] expert weights, any strides (e.g. ``w_ENK.transpose(1, 2)``).
        counts_E: [E] int32/int64 rows per expert on x's device; ``sum == T`` is the
            caller's contract (it is never read on the host: rows past the sum are
            left unwritten, a larger sum reads out of bounds).
        config: tile sizes for every kernel launch (forward and backward); default
            from ``block_table.choose_config``. Tests pass large blocks here.

    Accumulates in fp32. Needs Triton (RuntimeError otherwise); on CPU tensors it
    only works under the Triton interpreter (``TRITON_INTERPRET=1``).
    """
    _check_operands(x_TK, w_EKN, counts_E)
    return _GroupedMM.apply(x_TK, w_EKN, counts_E, config)
