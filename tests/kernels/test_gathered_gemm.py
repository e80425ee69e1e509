"""gathered_up_projection / gathered_grouped_gemm against a float64 gather + per-expert loop reference."""
import pytest
import torch

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytest.importorskip("triton", reason="moe_ep.kernels needs Triton (pip install triton)")

from .kernel_reference import up_projection_reference  # noqa: E402
from moe_ep.kernels.block_table import BlockConfig  # noqa: E402
from moe_ep.kernels.gathered_gemm import gathered_grouped_gemm, gathered_up_projection  # noqa: E402

pytestmark = pytest.mark.timeout(120)

CONFIG = BlockConfig(block_m=32, block_n=16, block_k=32)  # several tiles, masked edges
HIDDEN, INTER, SOURCE_ROWS = 40, 24, 50
TOL = {"rtol": 1e-5, "atol": 1e-4}


def _operands(counts, device, activation, transposed_weights=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, experts = sum(counts), len(counts)
    width = 2 * INTER if activation == "swiglu" else INTER
    x_src = torch.randn(SOURCE_ROWS, HIDDEN, generator=gen)
    row_index = torch.randint(0, SOURCE_ROWS, (rows,), generator=gen)  # repeats allowed
    if transposed_weights:
        w_in = torch.randn(experts, width, HIDDEN, generator=gen).transpose(1, 2) / HIDDEN**0.5
    else:
        w_in = torch.randn(experts, HIDDEN, width, generator=gen) / HIDDEN**0.5
    row_scale = torch.rand(rows, generator=gen)
    tensors = (x_src, row_index, torch.tensor(counts), w_in, row_scale)
    return tuple(t.to(device) for t in tensors)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous_w", "transposed_w"])
def test_activation_scale_and_pre_activations_match_reference(activation, transposed, device):
    counts = [9, 0, 33, 4]
    x_src, row_index, counts_E, w_in, row_scale = _operands(counts, device, activation, transposed)
    a, h = gathered_up_projection(x_src, row_index, counts_E, w_in, activation, row_scale, store_pre=True,
                                  config=CONFIG)
    a_ref, h_ref = up_projection_reference(x_src, row_index, counts, w_in, activation, row_scale)
    torch.testing.assert_close(a.double(), a_ref, **TOL)
    torch.testing.assert_close(h.double(), h_ref, **TOL)
    a_only, no_pre = gathered_up_projection(x_src, row_index, counts_E, w_in, activation, row_scale, config=CONFIG)
    assert no_pre is None and torch.equal(a_only, a)


def test_gathered_grouped_gemm_writes_every_element(device):
    counts = [0, 21, 14]
    x_src, row_index, counts_E, w_in, _ = _operands(counts, device, "gelu", seed=2)
    h = gathered_grouped_gemm(x_src, row_index, counts_E, w_in, config=CONFIG)
    _, h_ref = up_projection_reference(x_src, row_index, counts, w_in, "gelu")
    assert not h.isnan().any()
    torch.testing.assert_close(h.double(), h_ref, **TOL)


def test_epilogue_outputs_are_fully_written(device):
    from moe_ep.kernels.grouped_gemm_triton import launch_grouped_gemm

    counts = [0, 21, 14]
    x_src, row_index, counts_E, w_in, row_scale = _operands(counts, device, "swiglu", seed=5)
    out = torch.full((sum(counts), INTER), float("nan"), device=device)
    pre = torch.full((sum(counts), 2 * INTER), float("nan"), device=device)
    launch_grouped_gemm(x_src, w_in, counts_E, out, CONFIG, row_index=row_index, row_scale=row_scale,
                        activation="swiglu", pre_out=pre)
    assert not out.isnan().any() and not pre.isnan().any()


def test_zero_rows(device):
    x_src, row_index, counts_E, w_in, row_scale = _operands([0, 0], device, "swiglu", seed=3)
    a, h = gathered_up_projection(x_src, row_index, counts_E, w_in, "swiglu", row_scale, store_pre=True,
                                  config=CONFIG)
    assert a.shape == (0, INTER) and h.shape == (0, 2 * INTER)


def test_bfloat16_with_int32_indices(device):
    counts = [12, 0, 20]
    x_src, row_index, counts_E, w_in, row_scale = _operands(counts, device, "gelu", seed=4)
    x_src, w_in = x_src.bfloat16(), w_in.bfloat16()
    a, _ = gathered_up_projection(x_src, row_index.int(), counts_E.int(), w_in, "gelu", row_scale, config=CONFIG)
    assert a.dtype == torch.bfloat16
    a_ref, _ = up_projection_reference(x_src, row_index, counts, w_in, "gelu", row_scale)
    torch.testing.assert_close(a.double(), a_ref, rtol=2e-2, atol=2e-2)


def test_bad_operands_name_the_problem(device):
    x_src, row_index, counts_E, w_in, row_scale = _operands([3, 4], device, "gelu", seed=6)
    with pytest.raises(ValueError, match="unknown activation"):
        gathered_up_projection(x_src, row_index, counts_E, w_in, "relu", row_scale)
    with pytest.raises(TypeError, match="row_scale must be float32"):
        gathered_up_projection(x_src, row_index, counts_E, w_in, "gelu", row_scale.double())
    with pytest.raises(ValueError, match="counts must have shape"):
        gathered_up_projection(x_src, row_index, counts_E[:1], w_in, "gelu", row_scale)


@pytest.mark.parametrize("op", ["gathered_up_projection", "gathered_grouped_gemm"])
def test_out_of_range_rows_and_counts_are_refused_before_the_gather(op):
    """On CPU tensors (the interpreter): before, a bad index was read out of bounds and bad counts left rows
    unwritten or read past the end. On CUDA the same checks are device-side asserts, which leave the CUDA
    context unusable, so they are not provoked here."""
    x_src, row_index, counts_E, w_in, row_scale = _operands([3, 4], torch.device("cpu"), "gelu", seed=6)

    def call(rows, counts):
        if op == "gathered_up_projection":
            return gathered_up_projection(x_src, rows, counts, w_in, "gelu", row_scale, config=CONFIG)
        return gathered_grouped_gemm(x_src, rows, counts, w_in, config=CONFIG)

    call(row_index, counts_E)  # the valid operands pass
    for bad_row in (SOURCE_ROWS, -1):
        rows = row_index.clone()
        rows[5] = bad_row
        with pytest.raises(ValueError, match=rf"row_index: every entry must lie in \[0, {SOURCE_ROWS}\)"):
            call(rows, counts_E)
    for bad_counts in ([3, 5], [3, 3], [-1, 8]):
        with pytest.raises(ValueError, match="counts: must be non-negative and sum to 7"):
            call(row_index, torch.tensor(bad_counts))
