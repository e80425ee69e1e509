"""``moe_ep.expert_ffn`` on every backend against the formula in float64, forward and every gradient.

    y_S[s] = sum_{r : row_r = s} weight_r * act(x_S[s] W_in[e(r)]) W_out[e(r)]

The reference is written per pair with plain matmuls (no grouping, no gather
tricks) and differentiated by autograd. Triton runs in its interpreter on CPU.
"""
import pytest
import torch
import torch.nn.functional as F

from moe_ep.expert_ffn import SharedWeightGrads, expert_ffn

pytestmark = pytest.mark.timeout(120)

H, I, S = 24, 16, 9
COUNTS = [3, 0, 7, 2]  # an expert without rows


def _reference(x_SH, row_R, counts, weight_R, w_in, w_out, activation):
    """The formula, pair by pair, in float64."""
    y_SH = torch.zeros_like(x_SH)
    expert_R = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for r in range(row_R.numel()):
        e, s = int(expert_R[r]), int(row_R[r])
        h = x_SH[s] @ w_in[e]
        a = F.silu(h[:I]) * h[I:] if activation == "swiglu" else F.gelu(h)
        y_SH = y_SH.index_add(0, row_R[r:r + 1], (weight_R[r] * (a @ w_out[e]))[None])
    return y_SH


def _operands(activation, seed=0, hidden=H, inter=I, sources=S, counts=COUNTS):
    gen = torch.Generator().manual_seed(seed)
    J = 2 * inter if activation == "swiglu" else inter
    R, E = sum(counts), len(counts)
    x = torch.randn(sources, hidden, generator=gen)
    row = torch.randint(0, sources, (R,), generator=gen)  # repeats: a row reaching several experts
    weight = torch.rand(R, generator=gen)
    w_in = torch.randn(E, hidden, J, generator=gen) / hidden ** 0.5
    w_out = torch.randn(E, inter, hidden, generator=gen) / inter ** 0.5
    return x, row, torch.tensor(counts), weight, w_in, w_out


def _grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


BACKENDS = ["torch", "loop", pytest.param("triton", marks=pytest.mark.skipif(
    not __import__("moe_ep.kernels.runtime", fromlist=["triton_available"]).triton_available(), reason="no triton"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep_pre", "recompute"])
def test_forward_and_gradients_match_the_formula(backend, activation, recompute):
    """On a GPU the Triton case runs the compiled kernels (fp32 dots in IEEE precision)."""
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    x, row, counts, weight, w_in, w_out = _operands(activation)
    dy = torch.randn(S, H)

    def ours(x, weight, w_in, w_out):
        dev = [t.to(device) for t in (x, row, counts, weight, w_in, w_out)]
        return expert_ffn(dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], activation, backend, recompute).cpu()

    def reference(x, weight, w_in, w_out):
        return _reference(x, row, COUNTS, weight, w_in, w_out, activation)

    got = _grads(ours, (x, weight, w_in, w_out), dy)
    want = _grads(reference, [t.double() for t in (x, weight, w_in, w_out)], dy.double())
    for name, g, w in zip(("y", "x", "weight", "w_in", "w_out"), got, want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.count_nonzero(got[3][1]) == 0 and torch.count_nonzero(got[4][1]) == 0  # expert 1 had no rows


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_bf16_rows_with_fp32_gates_match_the_formula(backend, activation):
    """bf16 rows and weights, fp32 gate weights (as ``MoELayer`` hands them under autocast): every output and
    gradient within bf16 rounding of the float64 formula, each gradient in its input's dtype."""
    x, row, counts, weight, w_in, w_out = _operands(activation, seed=1)
    dy = torch.randn(S, H)

    def ours(x, weight, w_in, w_out):
        return expert_ffn(x, row, counts, weight, w_in, w_out, activation, backend)

    def reference(x, weight, w_in, w_out):
        return _reference(x, row, COUNTS, weight, w_in, w_out, activation)

    bf16 = [t.bfloat16() for t in (x, w_in, w_out)]
    got = _grads(ours, (bf16[0], weight, bf16[1], bf16[2]), dy.bfloat16())
    want = _grads(reference, [t.double() for t in (bf16[0], weight, bf16[1], bf16[2])], dy.bfloat16().double())
    for name, g, w, dtype in zip(("y", "x", "weight", "w_in", "w_out"), got, want,
                                 (torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16)):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), w, rtol=3e-2, atol=3e-2 * w.abs().max().item(), msg=name)


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_gate_gradient_in_row_chunks(monkeypatch, backend):
    """The gate weights' gradient, summed over chunks of a few rows (as for long batches), equals the formula."""
    import moe_ep.activations as module
    monkeypatch.setattr(module, "_DOT_CHUNK_ELEMENTS", 2 * I)  # two rows per chunk, a short last chunk
    x, row, counts, weight, w_in, w_out = _operands("gelu", seed=2)
    dy = torch.randn(S, H)
    got = _grads(lambda w: expert_ffn(x, row, counts, w, w_in, w_out, "gelu", backend), (weight,), dy)
    want = _grads(lambda w: _reference(x.double(), row, COUNTS, w, w_in.double(), w_out.double(), "gelu"),
                  (weight.double(),), dy.double())
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep_pre", "recompute"])
def test_loop_backward_in_blocks_of_experts(monkeypatch, activation, recompute):
    """The loop backend's backward one block of experts at a time (blocks of at least 5 rows here: [3, 0, 7] and
    [2, 0, 0], an empty expert inside and at the end) equals the formula."""
    import moe_ep.expert_backend as module
    J = 2 * I if activation == "swiglu" else I
    monkeypatch.setattr(module, "_BLOCK_ELEMENTS", 5 * J)
    counts = [3, 0, 7, 2, 0, 0]
    assert module._expert_blocks(counts, J) == [(0, 3, 0, 10), (3, 6, 10, 12)]
    x, row, counts_E, weight, w_in, w_out = _operands(activation, seed=4, counts=counts)
    dy = torch.randn(S, H)
    got = _grads(lambda *a: expert_ffn(a[0], row, counts_E, *a[1:], activation, "loop", recompute),
                 (x, weight, w_in, w_out), dy)
    want = _grads(lambda *a: _reference(a[0], row, counts, *a[1:], activation),
                  [t.double() for t in (x, weight, w_in, w_out)], dy.double())
    for name, g, w in zip(("y", "x", "weight", "w_in", "w_out"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_second_backward_through_a_retained_graph(backend, activation):
    """Backward leaves what it saved intact: a second backward (retain_graph) gives the same gradients."""
    x, row, counts, weight, w_in, w_out = _operands(activation, seed=3)
    leaves = [t.requires_grad_() for t in (x, weight, w_in, w_out)]
    y = expert_ffn(x, row, counts, weight, w_in, w_out, activation, backend)
    dy = torch.randn(S, H)
    first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    second = torch.autograd.grad(y, leaves, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _chunked(x, row, counts, weight, w_in, w_out, activation, backend, shared):
    """The rows in three chunks (one of them empty), each an ``expert_ffn`` call; the chunks' outputs summed."""
    expert_R = torch.repeat_interleave(torch.arange(len(counts)), counts)
    if shared is not None:
        w_in, w_out = shared.w_in, shared.w_out
    y = torch.zeros_like(x)
    for part in (slice(0, 5), slice(5, 5), slice(5, None)):
        y = y + expert_ffn(x, row[part], torch.bincount(expert_R[part], minlength=len(counts)), weight[part],
                           w_in, w_out, activation, backend, shared_grads=shared)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_shared_weight_gradient_of_chunks(backend, activation):
    """Chunks sharing one weight gradient: every gradient equals that of separate chunks, and so the formula's,
    also on a second pass over a retained graph; the chunks' backwards return no weight gradient of their own
    (one product pass after them does)."""
    x, row, counts, weight, w_in, w_out = _operands(activation)
    dy = torch.randn(S, H)
    leaves = [t.requires_grad_() for t in (x, weight, w_in, w_out)]
    separate = torch.autograd.grad(_chunked(x, row, counts, weight, w_in, w_out, activation, backend, None),
                                   leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, weight64, w_in64, w_out64 = leaves64
    reference = torch.autograd.grad(_reference(x64, row, counts.tolist(), weight64, w_in64, w_out64, activation),
                                    leaves64, dy.double())
    shared = SharedWeightGrads(w_in, w_out)
    y = _chunked(x, row, counts, weight, w_in, w_out, activation, backend, shared)
    for _ in range(2):
        got = torch.autograd.grad(y, leaves, dy, retain_graph=True)
        for g, s_, r in zip(got, separate, reference):
            torch.testing.assert_close(g, s_, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    # the input pass of a split backward: the chunks run and record, the product pass does not run ...
    torch.autograd.grad(y, [x], dy, retain_graph=True)
    # ... and the weight pass reruns them: what they recorded again replaces the first records
    got = torch.autograd.grad(y, [w_in, w_out], dy)
    torch.testing.assert_close(got[0], separate[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], separate[3], rtol=1e-6, atol=1e-6)


def test_shared_weights_must_be_the_shared_ones():
    x, row, counts, weight, w_in, w_out = _operands("swiglu")
    shared = SharedWeightGrads(w_in.requires_grad_(), w_out.requires_grad_())
    with pytest.raises(ValueError, match="pass its .w_in and .w_out"):
        expert_ffn(x, row, counts, weight, w_in, w_out, "swiglu", "loop", shared_grads=shared)


def test_gradcheck_in_float64():
    """The hand-written backward against finite differences (loop backend: float64)."""
    small = _operands("swiglu", hidden=4, inter=3, sources=4, counts=[2, 0, 3])
    x, row, counts, weight, w_in, w_out = (t.double() if t.is_floating_point() else t for t in small)
    leaves = [t.requires_grad_() for t in (x, weight, w_in, w_out)]
    assert torch.autograd.gradcheck(
        lambda *a: expert_ffn(a[0], row, counts, a[1], a[2], a[3], "swiglu", "loop"), leaves)


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_no_rows_keeps_the_graph(backend):
    """All pairs dropped: zeros out, zero gradients, and the output still depends on every input."""
    x, _, _, _, w_in, w_out = _operands("gelu")
    leaves = [t.requires_grad_() for t in (x, w_in, w_out)]
    weight = torch.zeros(0, requires_grad=True)
    y = expert_ffn(x, torch.zeros(0, dtype=torch.long), torch.zeros(len(COUNTS), dtype=torch.long), weight,
                   w_in, w_out, "gelu", backend)
    assert torch.equal(y, torch.zeros_like(x)) and y.requires_grad
    y.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


def test_bad_shapes_are_named():
    x, row, counts, weight, w_in, w_out = _operands("swiglu")
    with pytest.raises(ValueError, match="shapes do not match"):
        expert_ffn(x, row, counts, weight, w_in, w_out, "gelu")  # J = 2I is SwiGLU's width
    with pytest.raises(ValueError, match="expected counts"):
        expert_ffn(x, row, counts[:2], weight, w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="unknown expert backend"):
        expert_ffn(x, row, counts, weight, w_in, w_out, "swiglu", backend="cuda")


def test_saves_no_gathered_rows_for_backward():
    """What autograd keeps: the source rows, indices, weights and [R, J] pre-activations, never [R, H] copies."""
    x, row, counts, weight, w_in, w_out = _operands("gelu")
    R = row.numel()
    for recompute, kept_width in ((False, I), (True, None)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            expert_ffn(x.requires_grad_(), row, counts, weight, w_in.requires_grad_(), w_out, "gelu", "torch",
                       recompute)
        activations = [t for t in saved if t.dim() == 2 and t.shape[0] == R]
        assert [t.shape[1] for t in activations] == ([kept_width] if kept_width else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pre_activations_are_kept_only_when_a_backward_can_follow(monkeypatch, backend):
    """Before: ``keep_pre`` was ``not recompute`` alone, so under ``torch.no_grad()`` (evaluation, a distillation
    teacher) every forward wrote and held ``h`` [R, J] for a backward that never comes."""
    from moe_ep.expert_backend import _OPS

    ops, seen = _OPS[backend], []
    up = ops.up

    def spy(*args, keep_pre, **kwargs):
        seen.append(keep_pre)
        return up(*args, keep_pre=keep_pre, **kwargs)

    monkeypatch.setattr(ops, "up", spy)
    x, row, counts, weight, w_in, w_out = _operands("swiglu")
    with torch.no_grad():
        expert_ffn(x.requires_grad_(), row, counts, weight, w_in, w_out, "swiglu", backend)
    expert_ffn(x.detach(), row, counts, weight, w_in, w_out, "swiglu", backend)  # nothing requires grad
    expert_ffn(x.detach(), row, counts, weight.requires_grad_(), w_in, w_out, "swiglu", backend)
    expert_ffn(x.detach(), row, counts, weight, w_in, w_out, "swiglu", backend, recompute=True)
    assert seen == [False, False, True, False]


def test_routed_experts_share_weights_only_when_a_weight_gradient_follows():
    from moe_ep import MoEConfig
    from moe_ep.experts import RoutedExperts

    experts = RoutedExperts(MoEConfig(hidden_size=8, moe_intermediate_size=4, n_routed_experts=4,
                                      num_experts_per_tok=2), 2)
    shared = experts.share_weight_grads(torch.bfloat16)
    assert shared.w_in.dtype == torch.bfloat16 and shared.w_in.requires_grad
    with torch.no_grad():
        assert experts.share_weight_grads(torch.float32) is None
    experts.requires_grad_(False)
    assert experts.share_weight_grads(torch.float32) is None
