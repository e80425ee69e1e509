"""Grouped GEMMs that gather their rows on load: the first half of an expert FFN.

For sorted row ``r`` of expert ``e`` (``counts`` rows per expert, in order):

    h_r = x_src[row_index[r]] @ w_in[e]            gathered on load          [R, J]   gathered_grouped_gemm
    a_r = row_scale[r] * act(h_r)                  epilogue                  [R, I]   gathered_up_projection

``act`` is SwiGLU over the ``[gate | up]`` halves (J = 2I: two accumulators,
``silu(gate) * up``) or exact GELU (J = I). The expert-sorted copy of
``x_src`` is never written, and ``h`` reaches memory only when asked
(``store_pre``, for a backward that does not recompute it). Not
differentiable: ``moe_ep.expert_ffn`` holds the autograd function of the
whole FFN and calls these for its forward and its recomputation.

A gather reads wherever ``row_index`` points, so its values are checked
without a host sync: every entry in ``[0, S)`` and ``counts`` non-negative
summing to R. On CPU a bad value raises ``ValueError`` naming the argument.
On CUDA the checks are device-side asserts (``torch._assert_async``) queued
ahead of the kernel: a bad value trips the assertion (the device prints the
message), the kernel does not run, and the process sees ``RuntimeError: CUDA
error: device-side assert triggered`` at its next synchronisation (the CUDA
context is unusable after it).
"""
import torch

from .block_table import BlockConfig, choose_config
from .grouped_mm import DTYPES, check_counts
from .launchers import triton_launchers

_ACTIVATIONS = ("swiglu", "gelu")


def _check_operands(x_src, row_index, counts, w_in, activation, row_scale) -> None:
    num_experts, hidden, width = w_in.shape
    if activation is not None and activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {_ACTIVATIONS}")
    if x_src.dim() != 2 or x_src.shape[1] != hidden or (activation == "swiglu" and width % 2):
        raise ValueError(f"expected x_src [S, H] and w_in [E, H, J] (J even for SwiGLU), got {tuple(x_src.shape)} "
                         f"and {tuple(w_in.shape)}")
    if row_index.dim() != 1 or row_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"row_index must be a 1-D int32/int64 tensor, got {row_index.dtype} {tuple(row_index.shape)}")
    if row_scale is not None and (row_scale.shape != row_index.shape or row_scale.dtype != torch.float32):
        raise TypeError(f"row_scale must be float32 shaped like row_index {tuple(row_index.shape)}, got "
                        f"{row_scale.dtype} {tuple(row_scale.shape)}")
    if x_src.dtype not in DTYPES or w_in.dtype != x_src.dtype:
        raise TypeError(f"x_src and w_in must share a float dtype, got {x_src.dtype} and {w_in.dtype}")
    for name, tensor in (("row_index", row_index), ("w_in", w_in), ("row_scale", row_scale)):
        if tensor is not None and tensor.device != x_src.device:
            raise ValueError(f"{name} is on {tensor.device} but x_src is on {x_src.device}")
    check_counts(counts, num_experts, x_src.device)
    rows, sources = row_index.shape[0], x_src.shape[0]
    _require(((row_index >= 0) & (row_index < sources)).all(),
             f"row_index: every entry must lie in [0, {sources}) (the rows of x_src)")
    _require((counts.sum() == rows) & (counts >= 0).all(),
             f"counts: must be non-negative and sum to {rows} (the entries of row_index)")


def _require(ok: torch.Tensor, message: str) -> None:
    """``ValueError(message)`` unless the bool scalar ``ok``: read at once on CPU (no device to wait for), a
    device-side assert on CUDA (no host sync)."""
    if ok.is_cuda:
        torch._assert_async(ok, message)
    elif not ok:
        raise ValueError(message)


def gathered_up_projection(x_src: torch.Tensor, row_index: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor,
                           activation: str, row_scale: torch.Tensor | None = None, *, store_pre: bool = False,
                           config: BlockConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a [R, I], h [R, J] or None)`` of the module docstring, in x_src's dtype.

    Args:
        x_src: [S, H] source rows in any order (e.g. an all-to-all receive buffer).
        row_index: [R] int32/int64 in [0, S) (checked); sorted row ``r`` reads ``x_src[row_index[r]]``.
        counts: [E] int32/int64 rows per expert on the device, summing to R (checked, module docstring).
        w_in: [E, H, J], any strides; for SwiGLU columns [0, I) gate, [I, 2I) up.
        activation: ``"swiglu"`` or ``"gelu"``.
        row_scale: [R] float32 factor of each row (the gate weight); None for 1.
        store_pre: also return the pre-activations ``h``.
        config: tile sizes; default from ``block_table.choose_config``.

    Needs Triton; on CPU tensors only under the interpreter (``TRITON_INTERPRET=1``).
    """
    _check_operands(x_src, row_index, counts, w_in, activation, row_scale)
    rows, (num_experts, hidden, width) = row_index.shape[0], w_in.shape
    inter = width // 2 if activation == "swiglu" else width
    config = config or choose_config(rows, num_experts, hidden, inter, x_src.dtype,
                                     accumulators=2 if activation == "swiglu" else 1)
    pre = x_src.new_empty((rows, width)) if store_pre else None
    out = triton_launchers().launch_grouped_gemm(x_src, w_in, counts, x_src.new_empty((rows, inter)), config,
                                               row_index=row_index, row_scale=row_scale, activation=activation,
                                               pre_out=pre)
    return out, pre


def gathered_grouped_gemm(x_src: torch.Tensor, row_index: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, *,
                          config: BlockConfig | None = None) -> torch.Tensor:
    """``h [R, N]`` with ``h_r = x_src[row_index[r]] @ w[e(r)]`` (arguments as ``gathered_up_projection``)."""
    _check_operands(x_src, row_index, counts, w, None, None)
    rows, (num_experts, hidden, width) = row_index.shape[0], w.shape
    config = config or choose_config(rows, num_experts, hidden, width, x_src.dtype)
    return triton_launchers().launch_grouped_gemm(x_src, w, counts, x_src.new_empty((rows, width)), config,
                                                row_index=row_index)
