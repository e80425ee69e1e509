"""Device-side tile schedule shared by the grouped-GEMM kernels (Triton JIT helpers).

Rows of the grouped operand are sorted by expert: expert ``e`` owns rows
``[row_start_e, row_end_e)`` with ``row_end_e = cumsum(counts)[e]``. Each program
recomputes these prefix sums from ``counts`` on the device (a BLOCK_E-wide
``tl.cumsum``), so the host never reads ``counts`` and the launch grid depends on
``T`` and ``E`` only. All row indices and element offsets are int64: a row index
times a row stride overflows int32 at realistic sizes (e.g. 300k rows x 7168).
"""
import triton
import triton.language as tl


@triton.jit
def _load_counts(counts_ptr, num_experts, BLOCK_E: tl.constexpr):
    """(expert ids [BLOCK_E], counts as int64 [BLOCK_E]); lanes >= num_experts read 0."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0).to(tl.int64)
    return experts, counts


@triton.jit
def expert_row_range(counts_ptr, expert, num_experts, BLOCK_E: tl.constexpr):
    """(row_start, row_end) of ``expert`` as int64 scalars."""
    experts, counts = _load_counts(counts_ptr, num_experts, BLOCK_E)
    selected = experts == expert
    row_end = tl.sum(tl.where(selected, tl.cumsum(counts, axis=0), 0), axis=0)
    row_start = row_end - tl.sum(tl.where(selected, counts, 0), axis=0)
    return row_start, row_end


@triton.jit
def locate_row_tile(counts_ptr, tile, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map global row tile ``tile`` to (expert, first row of the tile, row_end of that expert).

    Expert ``e`` owns ``ceil(counts[e] / BLOCK_M)`` consecutive tiles; experts with
    zero rows own none. The expert of ``tile`` is the number of experts whose
    tiles all end at or before it. A returned expert >= ``num_experts`` means the
    tile lies past the real work and the program should exit.
    """
    experts, counts = _load_counts(counts_ptr, num_experts, BLOCK_E)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_ends <= tile).to(tl.int64), axis=0)
    selected = experts == expert
    first_tile = tl.sum(tl.where(selected, tile_ends - tiles, 0), axis=0)
    row_end = tl.sum(tl.where(selected, tl.cumsum(counts, axis=0), 0), axis=0)
    row_start = row_end - tl.sum(tl.where(selected, counts, 0), axis=0)
    return expert, row_start + (tile - first_tile) * BLOCK_M, row_end


@triton.jit
def tile_offsets(rows, cols, stride_row, stride_col):
    """int64 element offsets ``rows[:, None] * stride_row + cols[None, :] * stride_col``."""
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def dot_accumulate(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32; ``UPCAST`` casts 16-bit operands to fp32 first (interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
