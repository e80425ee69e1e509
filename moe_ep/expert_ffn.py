"""The routed experts' FFN over gathered rows: one autograd function for every backend.

For rows ``r`` sorted by expert (expert ``e`` owns ``counts_E[e]`` consecutive
rows), each reading source row ``row_R[r]`` of ``x_SH`` with gate weight
``weight_R[r]``:

    h_r   = x_S[row_r] W_in[e(r)]                         [R, J]  pre-activation
    a_r   = weight_r * act(h_r)                           [R, I]
    y_S   = sum over r with row_r = s of  a_r W_out[e(r)]  [S, H]

``act`` is SwiGLU over the ``[gate | up]`` halves of ``h`` (J = 2I; DeepSeek)
or exact GELU (J = I; classic MoE). The gate weight is applied to the narrow
activation rather than the ``[R, H]`` output (the same product), and the rows
are summed per source row inside the function, so no ``[R, H]`` tensor
outlives the forward.

Saved for backward: ``x_SH`` (the caller's tensor, typically the receive
buffer), the indices, the gate weights, the weights and ``h`` unless
``recompute`` (then ``h`` is recomputed: one extra grouped GEMM, the routed
experts' activation checkpointing). ``h`` is written only when a backward can
follow (grad mode on and some input requiring grad): under ``torch.no_grad()``
(evaluation, a distillation teacher) nothing ``[R, J]`` outlives the forward.
Backward, with ``dY_R = dY_S[row]``:

    dW_out[e] = a_e^T dY_e                  dA~ = dY_R W_out^T
    d weight_r = <dA~_r, act(h_r)>          dh = act'(h) (weight * dA~)
    dW_in[e]  = x_e^T dh_e                  dx_S = index_add over row of dh W_in^T

Precision: the function computes in the dtypes it receives (x and the
weights in one dtype; the gate weights in any float dtype, cast to x's to
scale the activation, their gradient computed in x's dtype, as autograd
would for ``act(h) * weight.to(x.dtype)``), forward and backward, with
autocast off whatever the caller's state: ``MoELayer`` chooses the compute
dtype and casts x once before dispatch, ``RoutedExperts`` casts the weights
to x's dtype.

Several calls on the same weights (the overlap chunks of one layer call)
can share one weight gradient (``SharedWeightGrads``): each call's backward
computes ``dx`` and ``d weight`` and records the operands of its weight
products, and one later node multiplies them all into one ``dW_in``, ``dW_out``.

Both passes are the backend's (``moe_ep.expert_backend``). Triton and torch
run each step over all rows with grouped products (Triton fuses the gather,
the activation and the gate weight into the first GEMM), reusing one
``[R, H]`` workspace per pass. The per-expert loop (CPU) runs its backward
expert by expert: every step of one expert's rows before the next expert's,
so besides ``h`` and the gradients no buffer spans all rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

from .activations import ACTIVATIONS
from .expert_backend import grouped_ops
from .precision import autocast_off

EXPERTS_LABEL = "moe_ep.experts"  # torch.profiler range of the forward (and of the backward, + ".backward")


class SharedWeightGrads:
    """One weight gradient for several ``expert_ffn`` calls on the same weights, taken after all of their backwards.

    The overlap chunks of one layer call (``moe_ep.dispatch.Dispatcher``) multiply the same expert weights. Alone,
    each chunk's backward would compute ``dW_in`` ``[E, H, J]`` and ``dW_out`` ``[E, I, H]`` from its rows before
    returning ``dx`` (so before its gradient can travel back), each into a fresh weight-sized buffer (on CPU
    new memory, page faults included: docs/performance.md), and autograd would add the c of them. Shared:

    * ``SharedWeightGrads(w_in, w_out)`` puts one node (``_WeightGradPass``, the identity in the forward) between
      the weights and every call, and the calls take its outputs ``.w_in``, ``.w_out`` as their weights;
    * each call's backward computes only ``dx`` and ``d weight`` (what its return trip waits for) and records
      the operands of its two weight products (its rows' ``scale * act(h)``, ``dY``, ``x``, ``dh``);
    * that node's backward, which autograd runs once every call's backward has run, multiplies them:

          dW = sum over the calls i of dW_i      (the first call's products written, the others' added in place)

    The node is created where the dispatcher has issued every chunk's first hop and before it receives the
    first one, so in the backward (autograd runs ready nodes in reverse creation order) it runs after the last
    chunk's gradient has been sent back and before that send is waited for: the weight products fill the
    pipeline's drain, as zero-bubble schedules place their W passes. The recorded operands wait for it: as
    many rows as one unchunked backward holds at once.

    Each call records into a slot of its own (``register``), replaced when its backward runs again: a second
    pass over a retained graph, or the weight pass of a split backward (zbv, dualpipev), which reruns the
    calls' backwards before this node's, multiplies what the last run recorded.
    """

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor):
        self._recorded: dict[int, dict[str, tuple]] = {}
        self._calls = 0
        self.w_in, self.w_out = _WeightGradPass.apply(w_in, w_out, self)

    def register(self) -> int:
        """A slot for one call's recorded operands."""
        self._calls += 1
        return self._calls - 1

    def recorder(self, slot: int, ops):
        """``defer`` of ``ops.ffn_backward`` for the call of ``slot``: ``record(name, a_R, b_R, counts_E)``."""
        products = self._recorded[slot] = {}

        def record(name: str, a_RK: torch.Tensor, b_RN: torch.Tensor, counts_E: torch.Tensor) -> None:
            products[name] = (ops, a_RK, b_RN, counts_E)
        return record

    def products(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(dW_in, dW_out)`` over the recorded calls (None where none recorded that product); clears them."""
        recorded, self._recorded = list(self._recorded.values()), {}
        grads = []
        for name in ("w_in", "w_out"):
            parts = [products[name] for products in recorded if name in products]
            total = None
            for ops, a_RK, b_RN, counts_E in parts:
                if total is None:
                    total = ops.wgrad(a_RK, b_RN, counts_E)
                else:
                    ops.wgrad_add(a_RK, b_RN, counts_E, total)
            grads.append(total)
        return grads[0], grads[1]


class _WeightGradPass(torch.autograd.Function):
    """The identity on the weights; its backward returns ``SharedWeightGrads.products()`` (plus any gradient that
    reached it another way)."""

    @staticmethod
    def forward(ctx, w_in, w_out, shared):
        ctx.shared = shared
        ctx.set_materialize_grads(False)  # the calls pass no gradient: no weight-sized zeros
        return w_in.view_as(w_in), w_out.view_as(w_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_w_in, d_w_out):
        with record_function(EXPERTS_LABEL + ".weight_grad"):
            got_in, got_out = ctx.shared.products()
        return _plus(got_in, d_w_in), _plus(got_out, d_w_out), None


def _plus(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else (a if b is None else a.add_(b))


class _ExpertFFN(torch.autograd.Function):
    # The passes themselves are the backend's (``ffn_forward`` / ``ffn_backward`` of moe_ep.expert_backend).
    @staticmethod
    def forward(ctx, x_SH, row_R, counts_E, weight_R, w_in, w_out, ops, activation, keep_pre, shared):
        with record_function(EXPERTS_LABEL):
            y_SH, h_RJ = ops.ffn_forward(x_SH, row_R, counts_E, weight_R, w_in, w_out, activation, keep_pre)
        ctx.save_for_backward(x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ)
        ctx.ops, ctx.activation, ctx.shared = ops, activation, shared
        ctx.slot = shared.register() if shared is not None else None
        return y_SH

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_SH):
        with autocast_off(dy_SH.device.type), record_function(EXPERTS_LABEL + ".backward"):
            x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ = ctx.saved_tensors
            need_x, _, _, need_weight, need_w_in, need_w_out = ctx.needs_input_grad[:6]
            defer = None if ctx.shared is None else ctx.shared.recorder(ctx.slot, ctx.ops)
            d_x, d_weight, d_w_in, d_w_out = ctx.ops.ffn_backward(
                dy_SH, x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ, ctx.activation,
                (need_x, need_weight, need_w_in, need_w_out), defer)
        d_weight = d_weight.to(weight_R.dtype) if need_weight else None
        return d_x, None, None, d_weight, d_w_in, d_w_out, None, None, None, None


def expert_ffn(x_SH: torch.Tensor, row_R: torch.Tensor, counts_E: torch.Tensor, weight_R: torch.Tensor,
               w_in: torch.Tensor, w_out: torch.Tensor, activation: str, backend: str = "auto",
               recompute: bool = False, shared_grads: Optional[SharedWeightGrads] = None) -> torch.Tensor:
    """``y_S`` of the module docstring; differentiable in x_SH, weight_R, w_in and w_out.

    Args:
        x_SH: [S, H] source rows (any order).
        row_R: [R] int64 source row of each expert-sorted row (repeats allowed).
        counts_E: [E] int64 rows per expert (sum R), on x's device.
        weight_R: [R] gate weight of each row (any float dtype; its gradient keeps it).
        w_in: [E, H, J]; w_out: [E, I, H], in x's dtype (the compute dtype; autocast does not apply).
        activation: ``swiglu`` or ``gelu``.
        backend: ``auto`` | ``triton`` | ``torch`` | ``loop`` (``moe_ep.expert_backend``).
        recompute: do not keep the pre-activations for backward; recompute them.
            Without a backward to come (grad mode off, or no input requiring
            grad) they are never kept.
        shared_grads: take the weight gradient with the other calls sharing it (``SharedWeightGrads``); ``w_in``
            and ``w_out`` must then be its ``.w_in`` and ``.w_out``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_ffn: unknown activation {activation!r}; choose from {ACTIVATIONS}")
    E, H, J = w_in.shape
    I = w_out.shape[1]
    if x_SH.dim() != 2 or x_SH.shape[1] != H or w_out.shape != (E, I, H) \
            or J != (2 * I if activation == "swiglu" else I):
        raise ValueError(f"expert_ffn: shapes do not match: x {tuple(x_SH.shape)}, w_in {tuple(w_in.shape)}, "
                         f"w_out {tuple(w_out.shape)} ({activation})")
    if counts_E.shape != (E,) or row_R.dim() != 1 or row_R.shape != weight_R.shape:
        raise ValueError(f"expert_ffn: expected counts [{E}] and row/weight [R], got counts "
                         f"{tuple(counts_E.shape)}, row {tuple(row_R.shape)}, weight {tuple(weight_R.shape)}")
    if w_in.dtype != x_SH.dtype or w_out.dtype != x_SH.dtype:
        raise ValueError(f"expert_ffn: x is {x_SH.dtype} but w_in is {w_in.dtype} and w_out {w_out.dtype}; "
                         f"cast the weights to x's dtype (the compute dtype)")
    if shared_grads is not None and (w_in is not shared_grads.w_in or w_out is not shared_grads.w_out):
        raise ValueError("expert_ffn: with shared_grads, pass its .w_in and .w_out as the weights")
    ops = grouped_ops(backend, x_SH, row_R.numel(), w_in, w_out)
    backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (x_SH, weight_R, w_in, w_out))
    with autocast_off(x_SH.device.type):
        return _ExpertFFN.apply(x_SH, row_R, counts_E, weight_R, w_in, w_out, ops, activation,
                                backward_follows and not recompute, shared_grads if backward_follows else None)


