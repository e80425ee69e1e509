"""The tile schedule and pointer offsets are int64: probed with huge logical counts, no huge memory.

A row index near 2**33 times a row stride of 7168 is ~6e13, far past int32; the
interpreter (like the GPU) wraps int32 arithmetic, so any int32 step shows up here.
"""
import pytest
import torch

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
triton = pytest.importorskip("triton", reason="moe_ep.kernels needs Triton (pip install triton)")
import triton.language as tl  # noqa: E402

from moe_ep.kernels.tile_schedule import expert_row_range, locate_row_tile, tile_offsets  # noqa: E402

pytestmark = pytest.mark.timeout(60)

BLOCK_M = 64
ROW_STRIDE = 7168
HUGE = 2**33 + 5


@triton.jit
def _probe_kernel(counts_ptr, out_ptr, tile, expert, num_experts, stride_row,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    found, first_row, row_end = locate_row_tile(counts_ptr, tile, num_experts, BLOCK_M, BLOCK_E)
    row_start, expert_end = expert_row_range(counts_ptr, expert, num_experts, BLOCK_E)
    tl.store(out_ptr + 0, found.to(tl.int64))
    tl.store(out_ptr + 1, first_row)
    tl.store(out_ptr + 2, row_end)
    tl.store(out_ptr + 3, row_start)
    tl.store(out_ptr + 4, expert_end)
    idx = tl.arange(0, 2)
    offsets = tile_offsets(first_row + idx, idx, stride_row, 1)
    tl.store(out_ptr + 5 + idx[:, None] * 2 + idx[None, :], offsets)


def _probe(device, counts, tile, expert):
    counts_E = torch.tensor(counts, dtype=torch.int64, device=device)
    out = torch.full((9,), -1, dtype=torch.int64, device=device)
    _probe_kernel[(1,)](counts_E, out, tile, expert, len(counts), ROW_STRIDE,
                        BLOCK_M=BLOCK_M, BLOCK_E=triton.next_power_of_2(len(counts)))
    return out.tolist()


def test_tile_past_int32_rows(device):
    counts = [HUGE, 0, 100]
    tiles_of_expert0 = -(-HUGE // BLOCK_M)
    found, first_row, row_end, row_start, expert_end, *offsets = _probe(device, counts, tiles_of_expert0, 2)
    assert (found, first_row, row_end) == (2, HUGE, HUGE + 100)
    assert (row_start, expert_end) == (HUGE, HUGE + 100)
    assert offsets == [HUGE * ROW_STRIDE, HUGE * ROW_STRIDE + 1,
                       (HUGE + 1) * ROW_STRIDE, (HUGE + 1) * ROW_STRIDE + 1]


def test_last_tile_of_huge_expert_and_past_the_end(device):
    counts = [HUGE, 0, 100]
    last = -(-HUGE // BLOCK_M) - 1
    found, first_row, row_end, *_ = _probe(device, counts, last, 0)
    assert (found, first_row, row_end) == (0, last * BLOCK_M, HUGE)
    past_end = -(-HUGE // BLOCK_M) + 2
    assert _probe(device, counts, past_end, 1)[0] >= len(counts)
