"""fused_swiglu_ffn forward and backward against an unfused float64 torch reference."""
import pytest
import torch

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytest.importorskip("triton", reason="moe_ep.kernels needs Triton (pip install triton)")

from .kernel_reference import grouped_mm_reference, swiglu_ffn_reference  # noqa: E402
from moe_ep.kernels import BlockConfig, fused_swiglu_ffn  # noqa: E402
from moe_ep.kernels.grouped_gemm_triton import launch_grouped_gemm  # noqa: E402

pytestmark = pytest.mark.timeout(120)

CONFIG = BlockConfig(block_m=32, block_n=16, block_k=32)  # several tiles, masked edges
HIDDEN, INTER, SOURCE_ROWS = 40, 24, 50
TOL = {"rtol": 1e-5, "atol": 1e-4}


def _operands(counts, device, transposed_weights=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, experts = sum(counts), len(counts)
    x_src = torch.randn(SOURCE_ROWS, HIDDEN, generator=gen)
    row_index = torch.randint(0, SOURCE_ROWS, (rows,), generator=gen)  # repeats allowed
    if transposed_weights:
        w_gate_up = torch.randn(experts, 2 * INTER, HIDDEN, generator=gen).transpose(1, 2) / HIDDEN**0.5
    else:
        w_gate_up = torch.randn(experts, HIDDEN, 2 * INTER, generator=gen) / HIDDEN**0.5
    w_down = torch.randn(experts, INTER, HIDDEN, generator=gen) / INTER**0.5
    row_weight = torch.rand(rows, generator=gen)
    tensors = (x_src, row_index, torch.tensor(counts), w_gate_up, w_down, row_weight)
    return tuple(t.to(device) for t in tensors)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous_w", "transposed_w_gate_up"])
def test_forward_and_backward_match_unfused(transposed, device):
    counts = [9, 0, 33, 4]
    x_src, row_index, counts_E, w_gate_up, w_down, row_weight = _operands(counts, device, transposed)
    leaves = [t.requires_grad_() for t in (x_src, w_gate_up, w_down, row_weight)]
    out = fused_swiglu_ffn(x_src, row_index, counts_E, w_gate_up, w_down, row_weight, config=CONFIG)
    assert out.shape == (sum(counts), HIDDEN) and out.dtype == torch.float32

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, wgu64, wd64, rw64 = leaves64
    ref = swiglu_ffn_reference(x64, row_index, counts, wgu64, wd64, rw64)
    torch.testing.assert_close(out.double(), ref, **TOL)

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out.backward(dout)
    ref.backward(dout.double())
    for name, got, want in zip(("x_src", "w_gate_up", "w_down", "row_weight"), leaves, leaves64):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL, msg=f"grad of {name}")
    assert torch.count_nonzero(w_down.grad[1]) == 0 and torch.count_nonzero(w_gate_up.grad[1]) == 0


def test_fused_epilogues_write_every_element(device):
    counts = [0, 21, 14]
    x_src, row_index, counts_E, w_gate_up, w_down, row_weight = _operands(counts, device, seed=2)
    h_RI = torch.full((sum(counts), INTER), float("nan"), device=device)
    launch_grouped_gemm(x_src, w_gate_up, counts_E, h_RI, CONFIG, row_index=row_index, swiglu=True)
    assert not h_RI.isnan().any()
    gu = grouped_mm_reference(x_src[row_index], w_gate_up, counts)
    torch.testing.assert_close(h_RI.double(), torch.nn.functional.silu(gu[:, :INTER]) * gu[:, INTER:], **TOL)

    out = torch.full((sum(counts), HIDDEN), float("nan"), device=device)
    launch_grouped_gemm(h_RI, w_down, counts_E, out, CONFIG, row_scale=row_weight)
    assert not out.isnan().any()
    ref = row_weight.double()[:, None] * grouped_mm_reference(h_RI, w_down, counts)
    torch.testing.assert_close(out.double(), ref, **TOL)


def test_zero_rows(device):
    x_src, row_index, counts_E, w_gate_up, w_down, row_weight = _operands([0, 0], device, seed=3)
    x_src.requires_grad_()
    w_down.requires_grad_()
    out = fused_swiglu_ffn(x_src, row_index, counts_E, w_gate_up, w_down, row_weight, config=CONFIG)
    assert out.shape == (0, HIDDEN)
    out.sum().backward()
    assert torch.equal(x_src.grad, torch.zeros_like(x_src))
    assert torch.equal(w_down.grad, torch.zeros_like(w_down))


def test_bfloat16_forward_with_int32_indices(device):
    counts = [12, 0, 20]
    x_src, row_index, counts_E, w_gate_up, w_down, row_weight = _operands(counts, device, seed=4)
    x_src, w_gate_up, w_down = (t.bfloat16() for t in (x_src, w_gate_up, w_down))
    row_index, counts_E = row_index.int(), counts_E.int()
    out = fused_swiglu_ffn(x_src, row_index, counts_E, w_gate_up, w_down, row_weight, config=CONFIG)
    assert out.dtype == torch.bfloat16
    ref = swiglu_ffn_reference(x_src, row_index, counts, w_gate_up, w_down, row_weight)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
