"""block_table picks configs from the tokens-per-expert bucket, never the raw token count."""
import pytest
import torch

from moe_ep.kernels.block_table import choose_config, choose_weight_grad_config, tokens_bucket

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("rows,experts,bucket", [(0, 8, 16), (1, 8, 16), (1000, 8, 128), (1024, 8, 128),
                                                 (1025, 8, 256), (10**7, 8, 4096)])
def test_bucket_is_clamped_power_of_two(rows, experts, bucket):
    assert tokens_bucket(rows, experts) == bucket


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k,n", [(2048, 2816), (1408, 2048), (7168, 4096), (40, 24)])
def test_configs_are_valid_and_depend_only_on_the_bucket(dtype, k, n):
    for rows in (16, 100, 1000, 8000, 40000):
        cfg = choose_config(rows, 8, k, n, dtype)
        for edge in (cfg.block_m, cfg.block_n, cfg.block_k):
            assert edge >= 16 and edge & (edge - 1) == 0
        same_bucket = (tokens_bucket(rows, 8) - 1) * 8  # other row count, same bucket
        if tokens_bucket(same_bucket, 8) == tokens_bucket(rows, 8):
            assert choose_config(same_bucket, 8, k, n, dtype) == cfg


def test_swiglu_halves_block_n():
    one = choose_config(8 * 1024, 8, 2048, 4096, torch.bfloat16)
    two = choose_config(8 * 1024, 8, 2048, 4096, torch.bfloat16, accumulators=2)
    assert two.block_n == one.block_n // 2


HOPPER_SHARED_BYTES = 227 * 1024  # largest shared memory one H100 block may use
DEEPSEEK_SHAPES = [(2048, 1408), (5120, 1536), (7168, 2048)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden,inter", DEEPSEEK_SHAPES)
def test_pipelined_tiles_fit_hopper_shared_memory(dtype, hidden, inter):
    """num_stages copies of the operand tiles (what the sm_90 codegen allocates) fit one block."""
    size = torch.finfo(dtype).bits // 8
    for rows_per_expert in (16, 64, 128, 512, 1024, 4096):
        rows = 8 * rows_per_expert
        for k, n, acc in ((hidden, 2 * inter, 1), (inter, hidden, 1), (hidden, inter, 2)):
            fwd = choose_config(rows, 8, k, n, dtype, accumulators=acc)
            fwd_bytes = fwd.num_stages * (fwd.block_m * fwd.block_k + acc * fwd.block_k * fwd.block_n) * size
            assert fwd_bytes <= HOPPER_SHARED_BYTES, (fwd, fwd_bytes)
            dw = choose_weight_grad_config(rows, 8, k, n, dtype)
            dw_bytes = dw.num_stages * (dw.block_k * dw.block_m + dw.block_m * dw.block_n) * size
            assert dw_bytes <= HOPPER_SHARED_BYTES, (dw, dw_bytes)
