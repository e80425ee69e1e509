"""Choose tile sizes for the grouped-GEMM kernels from a small fixed table.

The table is keyed on (tokens-per-expert bucket, K, N, dtype). The bucket is the
next power of two of ``ceil(T / E)`` clamped to [16, 4096], so it is computed on
the host from shapes alone (no device sync) and never keys anything on the raw
token count. The entries are untuned starting points for Hopper-class GPUs: they
follow the usual shape of grouped-GEMM configs (small BLOCK_M when experts get
few rows, wider tiles when they get many) and have not been measured here.
"""
import dataclasses

import torch

_MIN_BLOCK = 16  # smallest tile edge tl.dot accepts on NVIDIA GPUs
_MAX_BUCKET = 4096


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile edges (powers of two, >= 16) and launch options of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# (largest bucket, 16-bit dtype?) -> config, scanned in order; the last row per dtype is the catch-all.
_TABLE = (
    (32, True, BlockConfig(16, 128, 128, num_warps=4, num_stages=4)),
    (128, True, BlockConfig(64, 128, 64, num_warps=4, num_stages=4)),
    (512, True, BlockConfig(128, 128, 64, num_warps=8, num_stages=3)),
    (_MAX_BUCKET, True, BlockConfig(128, 256, 64, num_warps=8, num_stages=3)),
    (32, False, BlockConfig(16, 64, 64, num_warps=4, num_stages=3)),
    (128, False, BlockConfig(64, 64, 32, num_warps=4, num_stages=3)),
    (_MAX_BUCKET, False, BlockConfig(128, 64, 32, num_warps=8, num_stages=3)),
)


def _next_pow2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def tokens_bucket(num_rows: int, num_experts: int) -> int:
    """Power-of-two bucket of the mean rows per expert, clamped to [16, 4096]."""
    mean_rows = -(-num_rows // max(1, num_experts))
    return min(_MAX_BUCKET, max(_MIN_BLOCK, _next_pow2(mean_rows)))


def choose_config(num_rows: int, num_experts: int, k: int, n: int, dtype: torch.dtype,
                  accumulators: int = 1) -> BlockConfig:
    """Config for ``num_experts`` GEMMs [rows_e, k] x [k, n] with ``num_rows`` rows in all.

    The table row is picked by ``tokens_bucket(num_rows, num_experts)`` and dtype.
    ``accumulators=2`` (the fused SwiGLU up-projection keeps a gate and an up tile)
    halves BLOCK_N to keep register use level. Tile edges are clamped to the next
    power of two of ``k`` / ``n`` so tiny problems do not launch mostly-masked tiles;
    BLOCK_N = 256 is only used when ``n >= 2048``.
    """
    bucket = tokens_bucket(num_rows, num_experts)
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    row = next(cfg for top, is16, cfg in _TABLE if is16 == sixteen_bit and bucket <= top)
    block_n = row.block_n if n >= 2048 else min(row.block_n, 128)
    block_n = max(_MIN_BLOCK, block_n // accumulators)
    return BlockConfig(
        block_m=min(row.block_m, bucket),
        block_n=min(block_n, max(_MIN_BLOCK, _next_pow2(n))),
        block_k=min(row.block_k, max(_MIN_BLOCK, _next_pow2(k))),
        num_warps=row.num_warps,
        num_stages=row.num_stages,
    )


def choose_weight_grad_config(num_rows: int, num_experts: int, k: int, n: int, dtype: torch.dtype) -> BlockConfig:
    """Config for the per-expert weight gradient ``x_e^T [k, rows_e] @ dy_e [rows_e, n]``.

    The same table row as :func:`choose_config` (output tile BLOCK_K x BLOCK_N), with
    the rows reduced per step (BLOCK_M) capped at 64: its tiles are [BLOCK_K, BLOCK_M]
    and [BLOCK_M, BLOCK_N], and at BLOCK_N = 256 a 128-row step would need 240 KB of
    shared memory for three stages, more than an H100 block may use (227 KB).
    """
    config = choose_config(num_rows, num_experts, k, n, dtype)
    return dataclasses.replace(config, block_m=min(config.block_m, 64))
