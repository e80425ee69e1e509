"""Triton grouped-GEMM kernels and their launchers (imports Triton; load lazily).

Two kernels:

* ``_grouped_gemm_kernel``: ``out[r] = epilogue(a[src(r)] @ b[e(r)])`` for rows ``r``
  sorted by expert. One program per (row tile, column tile); the row-tile grid
  is the upper bound ``cdiv(R, BLOCK_M) + E`` and every program finds its expert
  and rows from ``counts`` on the device (see ``tile_schedule``), programs past
  the real work exit at once. Constexpr options fuse a row gather on load, an
  activation epilogue (SwiGLU over paired gate/up columns, or exact GELU), a
  store of the pre-activation accumulators, and a per-row fp32 scale epilogue
  applied after the activation.
* ``_weight_grad_kernel``: ``dw[e] = a[rows_e]^T @ g[rows_e]``. One program per
  (expert, K tile, N tile) loops over the expert's rows with both operands
  masked on the row range; an expert with no rows stores an exact zero tile.

Accumulation is fp32; outputs are stored in the output tensor's dtype. Launchers
take the output buffer from the caller (tests pre-fill it with NaN to check that
every element is written) and never read ``counts`` on the host.
"""
import torch
import triton
import triton.language as tl

from .block_table import BlockConfig
from .runtime import interpreting
from .tile_schedule import dot_accumulate, expert_row_range, locate_row_tile, tile_offsets


ACT_NONE, ACT_SWIGLU, ACT_GELU = 0, 1, 2
ACTIVATIONS = {None: ACT_NONE, "swiglu": ACT_SWIGLU, "gelu": ACT_GELU}


@triton.jit
def _gelu(x):
    """Exact GELU, ``x * Phi(x)`` with the erf form (torch's default)."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, out_ptr, pre_ptr, counts_ptr, row_index_ptr, row_scale_ptr,
    num_experts, N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_om, stride_on, stride_pm, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GATHER: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, ROW_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    expert, first_row, row_end = locate_row_tile(counts_ptr, tile, num_experts, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = first_row + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < row_end
    if GATHER:
        a_rows = tl.load(row_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    out_mask = row_ok[:, None] & col_ok[None, :]
    b_expert = b_ptr + expert * stride_be

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACTIVATION == 1:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        a = tl.load(a_ptr + tile_offsets(a_rows, ks, stride_am, stride_ak),
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_expert + tile_offsets(ks, cols, stride_bk, stride_bn), mask=b_mask, other=0.0)
        acc = dot_accumulate(a, b, acc, UPCAST, DOT_PRECISION)
        if ACTIVATION == 1:
            b_up = tl.load(b_expert + tile_offsets(ks, cols + N, stride_bk, stride_bn), mask=b_mask, other=0.0)
            acc_up = dot_accumulate(a, b_up, acc_up, UPCAST, DOT_PRECISION)

    if STORE_PRE:
        pre_dtype = pre_ptr.dtype.element_ty
        tl.store(pre_ptr + tile_offsets(rows, cols, stride_pm, stride_pn), acc.to(pre_dtype), mask=out_mask)
        if ACTIVATION == 1:
            tl.store(pre_ptr + tile_offsets(rows, cols + N, stride_pm, stride_pn), acc_up.to(pre_dtype),
                     mask=out_mask)
    if ACTIVATION == 1:
        acc = acc * tl.sigmoid(acc) * acc_up
    if ACTIVATION == 2:
        acc = _gelu(acc)
    if ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + tile_offsets(rows, cols, stride_om, stride_on), acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _weight_grad_kernel(
    a_ptr, g_ptr, dw_ptr, counts_ptr,
    num_experts, K, N,
    stride_am, stride_ak, stride_gm, stride_gn, stride_de, stride_dk, stride_dn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    cols = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k_ok = ks < K
    col_ok = cols < N
    row_start, row_end = expert_row_range(counts_ptr, expert, num_experts, BLOCK_E)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < row_end
        a_t = tl.load(a_ptr + tile_offsets(ks, rows, stride_ak, stride_am),
                      mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        g = tl.load(g_ptr + tile_offsets(rows, cols, stride_gm, stride_gn),
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_accumulate(a_t, g, acc, UPCAST, DOT_PRECISION)
    tl.store(dw_ptr + expert * stride_de + tile_offsets(ks, cols, stride_dk, stride_dn),
             acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def _dot_flags(dtype: torch.dtype) -> dict:
    """UPCAST 16-bit operands under the interpreter; exact (IEEE) fp32 dots, default otherwise."""
    is_fp32 = dtype == torch.float32
    return {"UPCAST": interpreting() and not is_fp32, "DOT_PRECISION": "ieee" if is_fp32 else None}


def launch_grouped_gemm(a, b, counts, out, config: BlockConfig, *, row_index=None, row_scale=None,
                        activation=None, pre_out=None):
    """Fill ``out [R, N]`` with ``epilogue(a[src(r)] @ b[e(r)])`` for rows sorted by expert; return ``out``.

    ``a [S, K]`` and ``b [E, K, N or 2N]`` may have any strides. ``src(r) = row_index[r]``
    when ``row_index [R]`` is given, else ``r`` (then S == R). ``counts [E]`` (integer,
    on the device, sum == R) gives the rows per expert. ``activation``:

    * None: ``out = a @ b``;
    * ``"swiglu"``: ``b`` has 2N columns and ``out = silu(a @ b[:, :N]) * (a @ b[:, N:])``;
    * ``"gelu"``: ``out = gelu(a @ b)`` (exact, erf form).

    ``pre_out [R, N or 2N]`` (optional) receives the accumulators before the
    activation (gate and up halves for SwiGLU), in its own dtype. With
    ``row_scale [R]`` (fp32) each output row is multiplied by its scale after
    the activation, before the cast.
    """
    rows, n = out.shape
    num_experts, k = b.shape[0], b.shape[1]
    if activation not in ACTIVATIONS:
        raise ValueError(f"launch_grouped_gemm: unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
    if rows == 0 or n == 0:
        return out
    pre_strides = (pre_out.stride(0), pre_out.stride(1)) if pre_out is not None else (0, 0)
    grid = (triton.cdiv(rows, config.block_m) + num_experts, triton.cdiv(n, config.block_n))
    _grouped_gemm_kernel[grid](
        a, b, out, pre_out, counts.contiguous(),
        None if row_index is None else row_index.contiguous(),
        None if row_scale is None else row_scale.contiguous(),
        num_experts, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        *pre_strides,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts),
        GATHER=row_index is not None, ACTIVATION=ACTIVATIONS[activation], STORE_PRE=pre_out is not None,
        ROW_SCALE=row_scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **_dot_flags(a.dtype),
    )
    return out


def launch_weight_grad(a, g, counts, out, config: BlockConfig):
    """Fill ``out [E, K, N]`` with ``a[rows_e]^T @ g[rows_e]`` per expert; return ``out``.

    ``a [R, K]`` and ``g [R, N]`` are sorted by expert with ``counts [E]`` rows each;
    experts with no rows get exact zeros. Any strides are accepted for all three.
    ``config.block_k`` x ``config.block_n`` is the output tile of one program and
    ``config.block_m`` the number of rows it reduces per step.
    """
    num_experts, k, n = out.shape
    if out.numel() == 0:
        return out
    if a.shape[0] == 0:
        return out.zero_()
    grid = (num_experts, triton.cdiv(k, config.block_k), triton.cdiv(n, config.block_n))
    _weight_grad_kernel[grid](
        a, g, out, counts.contiguous(),
        num_experts, k, n,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts),
        num_warps=config.num_warps, num_stages=config.num_stages,
        **_dot_flags(a.dtype),
    )
    return out
