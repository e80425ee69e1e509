"""moe_ep.half_matmul: half-precision products in float32 exactly where the CPU has no half matmul."""
import pytest
import torch
import torch.nn.functional as F

from moe_ep import half_matmul
from moe_ep.expert_ffn import expert_ffn

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", HALF)
def test_upcasts_exactly_on_cpus_without_onednn_half(dtype):
    onednn = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]()
    assert half_matmul.upcast(torch.ones(1, dtype=dtype)) is (not onednn)
    assert not half_matmul.upcast(torch.ones(1))  # float32 and float64 are never touched
    assert not half_matmul.upcast(torch.ones(1, dtype=torch.float64))


@pytest.fixture(params=[True, False], ids=["upcast", "native"])
def forced(request, monkeypatch):
    """Both paths on any CPU: the CPU check answers as the parameter says."""
    monkeypatch.setattr(half_matmul, "_cpu_lacks_half_matmul", lambda dtype: request.param)
    return request.param


@pytest.mark.parametrize("dtype", HALF)
def test_products_round_the_float32_product_once(forced, dtype):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((37, 24), (24, 19)))
    exact = a.double() @ b.double()
    out = half_matmul.mm_into(a.t().contiguous().t(), b, torch.empty(37, 19, dtype=dtype))  # a transposed view too
    acc = half_matmul.addmm_(torch.ones(37, 19, dtype=dtype), a, b)
    lin = half_matmul.linear(a, b.t())
    if forced:  # one rounding of the float32 product
        torch.testing.assert_close(out, (a.float() @ b.float()).to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(lin, out, rtol=0, atol=0)
        torch.testing.assert_close(acc, (1 + a.float() @ b.float()).to(dtype), rtol=0, atol=0)
    for got, want in ((out, exact), (lin, exact), (acc, 1 + exact)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_linear_gradients_are_those_of_the_product(forced):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(12, 8, generator=gen).bfloat16().requires_grad_()
    dy = torch.randn(16, 12, generator=gen).bfloat16()
    half_matmul.linear(x, w).backward(dy)
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), dy.double() @ w.double(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad.double(), dy.double().t() @ x.double(), rtol=1e-2, atol=1e-2)


def test_loop_backend_in_bf16_equals_its_float32_products_rounded(forced, monkeypatch):
    """The expert FFN of the loop backend, both paths, against the float64 formula within bf16's rounding;
    every product of the loop goes through half_matmul."""
    calls = []
    for name in ("mm_into", "addmm_"):
        def spy(*args, _f=getattr(half_matmul, name)):
            calls.append(args[0].dtype)
            return _f(*args)
        monkeypatch.setattr(half_matmul, name, spy)
    gen = torch.Generator().manual_seed(2)
    E, H, I, S = 3, 8, 6, 10
    x = torch.randn(S, H, generator=gen).bfloat16().requires_grad_()
    w_in = (torch.randn(E, H, I, generator=gen) / 3).bfloat16().requires_grad_()
    w_out = (torch.randn(E, I, H, generator=gen) / 3).bfloat16().requires_grad_()
    row_R = torch.tensor([0, 3, 5, 1, 2, 9, 4])
    counts_E = torch.tensor([3, 0, 4])
    weight_R = torch.rand(7, generator=gen)
    y = expert_ffn(x, row_R, counts_E, weight_R, w_in, w_out, activation="gelu", backend="loop")
    y.backward(torch.ones_like(y))
    assert calls == [torch.bfloat16] * (E * 6)  # six products per expert (2 forward, 4 backward), empty ones too
    expert = torch.repeat_interleave(torch.arange(E), counts_E)
    x64, wi64, wo64 = (t.detach().double().requires_grad_() for t in (x, w_in, w_out))
    h = torch.einsum("rh,rhi->ri", x64[row_R], wi64[expert])
    y_r = torch.einsum("ri,rih->rh", F.gelu(h), wo64[expert]) * weight_R.double()[:, None]
    y64 = torch.zeros(S, H, dtype=torch.float64).index_add(0, row_R, y_r)
    y64.backward(torch.ones_like(y64))
    for got, want in ((y, y64), (x.grad, x64.grad), (w_in.grad, wi64.grad), (w_out.grad, wo64.grad)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)


def test_linear_under_autocast_computes_what_autocast_computes(forced):
    """fp32 operands under CPU bf16 autocast: bf16 result and fp32 gradients, as ``F.linear`` under autocast."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=gen).requires_grad_()
    w = torch.randn(12, 8, generator=gen).requires_grad_()
    dy = torch.randn(16, 12, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = half_matmul.linear(x, w)
        want = F.linear(x, w)
    assert got.dtype == want.dtype == torch.bfloat16
    if forced:  # operands rounded to bf16, one float32 product, one rounding
        exact = (x.detach().bfloat16().float() @ w.detach().bfloat16().float().t()).bfloat16()
        torch.testing.assert_close(got, exact, rtol=0, atol=0)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    (gx, gw), (wx, ww) = (torch.autograd.grad(y, (x, w), dy.bfloat16()) for y in (got, want))
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, wx, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw, ww, rtol=1e-2, atol=1e-2)


def test_linear_module_is_an_nn_linear_with_its_state_dict(forced):
    plain = torch.nn.Linear(8, 5)
    ours = half_matmul.Linear(8, 5)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), plain(x))  # float32: the plain product
    xb = x.bfloat16()
    torch.testing.assert_close(ours.bfloat16()(xb).float(), plain.bfloat16()(xb).float(), rtol=2e-2, atol=2e-2)
