"""MoELayer: gradients (gradcheck), input checks, shapes, expert backends, bf16."""
import pytest
import torch
from torch.func import functional_call

from moe_ep import MoEConfig, MoELayer
from moe_ep.expert_backend import choose_backend, grouped_mm_problem, resolve_backend

pytestmark = pytest.mark.timeout(120)

BASE = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)
TINY_LOSSES = dict(expert_balance_coef=0.1, device_balance_coef=0.1, comm_balance_coef=0.1, switch_coef=0.1,
                   z_loss_coef=0.01)
GRADCHECK_CASES = {
    "v2_device_limited": dict(hidden_size=4, moe_intermediate_size=3, n_routed_experts=4, num_experts_per_tok=2,
                              n_shared_experts=1, topk_method="device_limited", n_group=2, topk_group=1,
                              routed_scaling_factor=2.0, **TINY_LOSSES),
    "v3_node_limited_bias": dict(hidden_size=4, moe_intermediate_size=3, n_routed_experts=4, num_experts_per_tok=2,
                                 n_shared_experts=1, scoring_func="sigmoid", topk_method="node_limited", n_group=2,
                                 topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, aux_free_bias=True,
                                 seq_balance_coef=0.1, z_loss_coef=0.01),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_input_and_every_parameter(case):
    cfg = MoEConfig(**GRADCHECK_CASES[case], router_dtype="float64", expert_backend="loop")
    layer = MoELayer(cfg).double()
    if cfg.aux_free_bias:
        with torch.no_grad():
            layer.router.e_score_correction_bias.copy_(0.1 * torch.randn(4))
    names = [n for n, _ in layer.named_parameters()]
    assert {"router.weight", "experts.w_in", "experts.w_out", "shared_experts.gate_proj.weight",
            "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"} <= set(names)
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def run(x, *flat):
        y = functional_call(layer, dict(zip(names, flat)), (x,))
        return y, layer.aux_loss

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)

    # Every part receives a non-zero gradient, the router also through the gate values alone.
    y, aux = run(x, *params)
    grads = torch.autograd.grad(y.square().sum() + aux, [x, *params])
    for name, g in zip(["input", *names], grads):
        assert g is not None and g.abs().sum() > 0, name
    (router_grad,) = torch.autograd.grad(run(x, *params)[0].sum(), params[names.index("router.weight")])
    assert router_grad.abs().sum() > 0


def test_bad_hidden_size_names_the_size():
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(ValueError, match="16") as info:
        layer(torch.randn(2, 3, 12))
    assert "12" in str(info.value)
    with pytest.raises(ValueError):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    x = torch.randn(2, 3, 16)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        MoELayer(MoEConfig(**BASE, check_finite=True))(x)
    MoELayer(MoEConfig(**BASE))(x)  # unchecked by default: no host sync, no error


@pytest.mark.parametrize("shape", [(0, 16), (0, 5, 16), (3, 0, 16)])
@pytest.mark.parametrize("backend", ["auto", "torch", "loop"])
def test_empty_batch(shape, backend):
    cfg = MoEConfig(**BASE, expert_backend=backend, expert_balance_coef=0.01, seq_balance_coef=0.01,
                    z_loss_coef=0.01, device_capacity_factor=1.0)
    layer = MoELayer(cfg).train()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(layer.aux_loss) and layer.aux_loss.item() == 0.0
    stats = layer.last_stats.as_dict()
    assert stats["routed_pairs"] == 0 and stats["dropped_pairs"] == 0
    (y.sum() + layer.aux_loss).backward()
    assert x.grad.shape == x.shape


def test_two_and_three_dimensional_inputs_give_the_same_tokens():
    layer = MoELayer(MoEConfig(**BASE))
    x = torch.randn(3, 5, 16)
    y3 = layer(x)
    y2 = layer(x.reshape(15, 16))
    y1 = layer(x[1, 2])
    assert y3.shape == (3, 5, 16) and y2.shape == (15, 16) and y1.shape == (16,)
    assert torch.allclose(y3.reshape(15, 16), y2, atol=1e-6)
    assert torch.allclose(y1, y3[1, 2], atol=1e-6)
    y4 = layer(x.reshape(1, 3, 5, 16))
    assert torch.allclose(y4.reshape(15, 16), y2, atol=1e-6)


def test_output_is_shared_plus_gated_experts_without_residual():
    cfg = MoEConfig(**{**BASE, "num_experts_per_tok": 3}, routed_scaling_factor=3.0, norm_topk_prob=True)
    layer = MoELayer(cfg)
    x = torch.randn(6, 16)
    y = layer(x)
    with torch.no_grad():
        r = layer.router(x)
        want = layer.shared_experts(x)
        for t in range(6):
            for k in range(3):
                e = int(r.topk_idx_TK[t, k])
                gate, up = (x[t] @ layer.experts.w_in[e]).chunk(2)
                want[t] += r.topk_weight_TK[t, k] * ((torch.nn.functional.silu(gate) * up) @ layer.experts.w_out[e])
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)


BACKEND_CASES = {
    "greedy_swiglu": BASE,
    "v2_dropping_swiglu": dict(BASE, num_experts_per_tok=3, topk_method="device_limited", n_group=4, topk_group=2,
                               device_capacity_factor=1.0, protected_seq_frac=0.5),
    "gelu_expert_capacity_recompute": dict(BASE, activation="gelu", expert_capacity_factor=1.0,
                                           recompute_experts=True),
}


@pytest.mark.parametrize("other", ["loop", "triton"])
@pytest.mark.parametrize("case", sorted(BACKEND_CASES))
def test_expert_backends_agree_with_torch(case, other):
    """Outputs, input gradient and every parameter gradient; Triton runs in its interpreter on CPU
    and compiled on a GPU (then both layers run there)."""
    if other == "triton":
        pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg_kw = BACKEND_CASES[case]
    torch_layer = MoELayer(MoEConfig(**cfg_kw, expert_backend="torch")).to(device)
    other_layer = MoELayer(MoEConfig(**cfg_kw, expert_backend=other)).to(device)
    other_layer.load_state_dict(torch_layer.state_dict())
    x = torch.randn(4, 9, 16, device=device)
    outs, grads = [], []
    for layer in (torch_layer, other_layer):
        x_leaf = x.clone().requires_grad_()
        y = layer(x_leaf)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append({"input": x_leaf.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}})
    assert other_layer.last_stats.dropped_pairs == torch_layer.last_stats.dropped_pairs
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5), name


def test_auto_backend_on_cpu():
    w = torch.randn(8, 16, 16)
    assert resolve_backend("auto", torch.randn(5, 16), w) == "loop"                        # CPU: the loop
    assert resolve_backend("torch", torch.randn(5, 16), w) == "torch"                      # asked for
    assert resolve_backend("torch", torch.randn(0, 16), w) == "loop"                       # empty
    with pytest.raises(ValueError, match="unknown expert backend"):
        resolve_backend("cuda", torch.randn(5, 16), w)
    layer = MoELayer(MoEConfig(**BASE)).double()  # auto falls back to the loop in float64
    y = layer(torch.randn(2, 3, 16, dtype=torch.float64))
    assert y.dtype == torch.float64


CUDA_FACTS = dict(triton=True, grouped_mm=None, aligned=True)


def test_auto_on_cuda_falls_back_to_the_loop_for_dtypes_the_kernels_lack():
    # Before: auto picked Triton for float64 on CUDA, whose kernels then refused it with a TypeError.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert choose_backend("auto", "cuda", dtype, 5, **CUDA_FACTS) == "triton"
    float64_grouped_mm = grouped_mm_problem("cuda", torch.float64, (9, 0), "2.13.0")
    for triton in (True, False):
        assert choose_backend("auto", "cuda", torch.float64, 5, triton=triton, grouped_mm=float64_grouped_mm,
                              aligned=True) == "loop"
    assert choose_backend("auto", "cuda", torch.bfloat16, 5, triton=False, grouped_mm=None, aligned=True) == "torch"
    assert choose_backend("auto", "cuda", torch.bfloat16, 5, triton=False, grouped_mm=None, aligned=False) == "loop"
    assert choose_backend("auto", "cpu", torch.float32, 5, **CUDA_FACTS) == "loop"
    assert choose_backend("auto", "cuda", torch.float32, 0, **CUDA_FACTS) == "loop"  # empty


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forced_backend_refuses_a_dtype_it_cannot_run(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    layer = MoELayer(MoEConfig(**BASE, expert_backend=backend)).double()
    with pytest.raises(ValueError, match=rf"expert_backend '{backend}': .*not torch\.float64"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"expert_backend '{backend}'.*not torch\.float64"):
        choose_backend(backend, "cuda", torch.float64, 5, triton=True,
                       grouped_mm=grouped_mm_problem("cuda", torch.float64, (9, 0), "2.13.0"), aligned=True)


def test_torch_backend_availability_follows_the_torch_version():
    assert grouped_mm_problem("cpu", torch.float32, None, "2.13.0") is None
    assert grouped_mm_problem("cuda", torch.float16, (8, 0), "2.9.1") is None
    assert grouped_mm_problem("cuda", torch.bfloat16, (9, 0), "2.8.0") is None
    assert "has no torch._grouped_mm" in grouped_mm_problem("cuda", torch.bfloat16, (9, 0), "2.7.1")
    assert "no CPU kernel" in grouped_mm_problem("cpu", torch.bfloat16, None, "2.8.0")
    assert "not torch.float32" in grouped_mm_problem("cuda", torch.float32, (9, 0), "2.8.0")
    assert "capability 9.x; this device has 8.0" in grouped_mm_problem("cuda", torch.bfloat16, (8, 0), "2.8.0")
    assert "capability 8.0 or above; this device has 7.5" in grouped_mm_problem("cuda", torch.float32, (7, 5), "2.9.0")
    assert "not mps" in grouped_mm_problem("mps", torch.float32, None, "2.13.0")
    missing = grouped_mm_problem("cpu", torch.float32, None, "2.7.1")
    with pytest.raises(ValueError, match=r"expert_backend 'torch': torch 2\.7\.1 has no torch\._grouped_mm"):
        choose_backend("torch", "cpu", torch.float32, 5, triton=False, grouped_mm=missing, aligned=True)
    with pytest.raises(ValueError, match="16-byte aligned"):
        choose_backend("torch", "cpu", torch.float32, 5, triton=False, grouped_mm=None, aligned=False)
    assert choose_backend("auto", "cuda", torch.float32, 5, triton=False, grouped_mm=missing, aligned=True) == "loop"


def test_bf16_layer_on_cpu():
    cfg = MoEConfig(**{**BASE, "num_experts_per_tok": 3}, expert_balance_coef=0.01)
    layer = MoELayer(cfg).to(torch.bfloat16)
    x = torch.randn(2, 7, 16).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert layer.aux_loss.dtype == torch.float32 and torch.isfinite(layer.aux_loss)
    (y.float().square().sum() + layer.aux_loss).backward()
    assert layer.experts.w_in.grad.dtype == torch.bfloat16

    reference = MoELayer(cfg)  # fp32 copy of the same (bf16-rounded) weights: identical routing
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    y_ref = reference(x.float())
    assert torch.allclose(y.float(), y_ref, rtol=5e-2, atol=5e-2)
    assert (y.float() - y_ref).abs().max() > 0  # really computed in bf16
