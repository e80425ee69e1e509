"""grouped_mm forward, dX and dW against a float64 per-expert loop (Triton; interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytest.importorskip("triton", reason="moe_ep.kernels needs Triton (pip install triton)")

from .kernel_reference import grouped_mm_reference  # noqa: E402
from moe_ep.kernels.block_table import BlockConfig  # noqa: E402
from moe_ep.kernels.grouped_mm import grouped_mm  # noqa: E402
from moe_ep.kernels.grouped_gemm_triton import launch_grouped_gemm, launch_weight_grad  # noqa: E402

pytestmark = pytest.mark.timeout(120)

LARGE = BlockConfig(block_m=64, block_n=64, block_k=64)  # one tile per expert and K/N in these tests
SMALL = BlockConfig(block_m=16, block_n=16, block_k=16)  # several row/col/K tiles, masked edges
TOL = {"rtol": 1e-5, "atol": 1e-4}

COUNT_CASES = {
    "uneven_with_zeros": [7, 0, 30, 0, 13, 2],
    "all_rows_on_one_expert": [0, 0, 45, 0],
    "leading_and_trailing_zeros": [0, 17, 0, 0, 31, 0],
}


def _operands(counts, k, n, device, transposed=False, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_TK = torch.randn(sum(counts), k, generator=gen).to(device, dtype)
    if transposed:
        w_EKN = torch.randn(len(counts), n, k, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        w_EKN = torch.randn(len(counts), k, n, generator=gen).to(device, dtype)
    return x_TK, w_EKN, torch.tensor(counts, device=device)


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
@pytest.mark.parametrize("config", [LARGE, SMALL], ids=["large_blocks", "small_blocks"])
def test_forward_matches_loop(case, config, device):
    counts = COUNT_CASES[case]
    x_TK, w_EKN, counts_E = _operands(counts, k=40, n=24, device=device)
    out = grouped_mm(x_TK, w_EKN, counts_E, config=config)
    assert out.shape == (sum(counts), 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), grouped_mm_reference(x_TK, w_EKN, counts), **TOL)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous_w", "transposed_w"])
@pytest.mark.parametrize("counts", [[11, 0, 29, 5], [0, 48, 0]], ids=["uneven", "one_expert"])
def test_backward_matches_loop(transposed, counts, device):
    x_TK, w_EKN, counts_E = _operands(counts, k=36, n=20, device=device, transposed=transposed, seed=1)
    x_TK.requires_grad_()
    w_EKN.requires_grad_()
    dy_TN = torch.randn(sum(counts), 20, generator=torch.Generator().manual_seed(2)).to(device)
    grouped_mm(x_TK, w_EKN, counts_E, config=SMALL).backward(dy_TN)

    x64 = x_TK.detach().double().requires_grad_()
    w64 = w_EKN.detach().double().requires_grad_()
    grouped_mm_reference(x64, w64, counts).backward(dy_TN.double())
    torch.testing.assert_close(x_TK.grad.double(), x64.grad, **TOL)
    torch.testing.assert_close(w_EKN.grad.double(), w64.grad, **TOL)
    for e, count in enumerate(counts):
        if count == 0:
            assert torch.count_nonzero(w_EKN.grad[e]) == 0, f"expert {e} has no rows but a nonzero dW"


def test_non_contiguous_activations_and_sliced_weights(device):
    counts = [9, 0, 14]
    x_big, w_EKN, counts_E = _operands(counts, k=64, n=24, device=device, seed=3)
    x_TK = x_big[:, ::2]  # row stride 64, column stride 2
    out = grouped_mm(x_TK, w_EKN[:, :32], counts_E, config=SMALL)
    torch.testing.assert_close(out.double(), grouped_mm_reference(x_TK, w_EKN[:, :32], counts), **TOL)


def test_zero_tokens(device):
    x_TK, w_EKN, counts_E = _operands([0, 0, 0], k=16, n=24, device=device)
    x_TK.requires_grad_()
    w_EKN.requires_grad_()
    out = grouped_mm(x_TK, w_EKN, counts_E, config=LARGE)
    assert out.shape == (0, 24)
    out.sum().backward()
    assert x_TK.grad.shape == (0, 16)
    assert torch.equal(w_EKN.grad, torch.zeros_like(w_EKN))


def test_every_output_element_is_written(device):
    counts = [13, 0, 21, 1]
    x_TK, w_EKN, counts_E = _operands(counts, k=40, n=24, device=device, seed=4)
    out = torch.full((sum(counts), 24), float("nan"), device=device)
    launch_grouped_gemm(x_TK, w_EKN, counts_E, out, SMALL)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), grouped_mm_reference(x_TK, w_EKN, counts), **TOL)


def test_weight_grad_writes_exact_zeros_for_empty_experts(device):
    counts = [0, 13, 0, 21, 0]
    x_TK, _, counts_E = _operands(counts, k=40, n=24, device=device, seed=5)
    dy_TN = torch.randn(sum(counts), 24, generator=torch.Generator().manual_seed(6)).to(device)
    dw_EKN = torch.full((len(counts), 40, 24), float("nan"), device=device)
    launch_weight_grad(x_TK, dy_TN, counts_E, dw_EKN, SMALL)
    assert not dw_EKN.isnan().any()
    for e in (0, 2, 4):
        assert torch.equal(dw_EKN[e], torch.zeros_like(dw_EKN[e]))
    torch.testing.assert_close(dw_EKN[1].double(), x_TK[:13].double().T @ dy_TN[:13].double(), **TOL)
    torch.testing.assert_close(dw_EKN[3].double(), x_TK[13:].double().T @ dy_TN[13:].double(), **TOL)


def test_int32_counts(device):
    counts = [5, 0, 19]
    x_TK, w_EKN, counts_E = _operands(counts, k=24, n=16, device=device, seed=7)
    out = grouped_mm(x_TK, w_EKN, counts_E.to(torch.int32), config=LARGE)
    torch.testing.assert_close(out.double(), grouped_mm_reference(x_TK, w_EKN, counts), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_backward(dtype, device):
    """16-bit operands accumulate in fp32 (upcast dot under the interpreter); output in x's dtype."""
    counts = [6, 0, 27, 11]
    x_TK, w_EKN, counts_E = _operands(counts, k=40, n=24, device=device, dtype=dtype, seed=8)
    x_TK.requires_grad_()
    w_EKN.requires_grad_()
    out = grouped_mm(x_TK, w_EKN, counts_E, config=LARGE)
    assert out.dtype == dtype
    ref = grouped_mm_reference(x_TK.detach(), w_EKN.detach(), counts)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=5e-2)
    dy_TN = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    out.backward(dy_TN)
    x64 = x_TK.detach().double().requires_grad_()
    w64 = w_EKN.detach().double().requires_grad_()
    grouped_mm_reference(x64, w64, counts).backward(dy_TN.double())
    torch.testing.assert_close(x_TK.grad.double(), x64.grad, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(w_EKN.grad.double(), w64.grad, rtol=1e-2, atol=1e-1)


def test_default_config_from_block_table(device):
    counts = [3, 0, 40]
    x_TK, w_EKN, counts_E = _operands(counts, k=24, n=40, device=device, seed=10)
    torch.testing.assert_close(grouped_mm(x_TK, w_EKN, counts_E).double(),
                               grouped_mm_reference(x_TK, w_EKN, counts), **TOL)


def test_rejects_bad_operands(device):
    x_TK, w_EKN, counts_E = _operands([4, 4], k=16, n=16, device=device)
    with pytest.raises(ValueError):
        grouped_mm(x_TK, w_EKN[:, :8], counts_E)
    with pytest.raises(ValueError):
        grouped_mm(x_TK, w_EKN, counts_E[:1])
    with pytest.raises(TypeError):
        grouped_mm(x_TK, w_EKN, counts_E.float())
    with pytest.raises(TypeError):
        grouped_mm(x_TK, w_EKN.double(), counts_E)
