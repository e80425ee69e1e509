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
adds ``dW_in``, ``dW_out`` into one sum and the last to run returns it.

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
from .expert_backend import GradSums, grouped_ops
from .precision import autocast_off

EXPERTS_LABEL = "moe_ep.experts"  # torch.profiler range of the forward (and of the backward, + ".backward")


class SharedWeightGrads:
    """One weight gradient for several ``expert_ffn`` calls on the same weights: the overlap chunks of one layer call.

    Alone, each of c calls returns a fresh ``dW_in`` ``[E, H, J]`` and ``dW_out`` ``[E, I, H]`` from its
    backward and autograd adds the c of them: c weight-sized buffers (on CPU new memory each, page faults
    included: docs/performance.md) and c - 1 adds, a cost that grows with c while the rest of the backward does
    not. Shared, every call's backward adds its products into one sum (the loop backend with ``addmm_``, no
    temporary; the grouped ones add their result) and the last call to run its backward returns

        dW = sum over the calls i of dW_i

    while the others return None (no gradient) for the weights, so autograd sees one tensor.

    Contract: the calls register in their forward (``expert_ffn`` registers those a backward follows), and
    every backward pass runs the backward of every registered call (true when their outputs meet in one graph,
    as the chunks do in the combine). A pass that completes resets the count, so a retained graph can be
    back-propagated again.
    """

    def __init__(self):
        self.sums = GradSums()
        self._registered = self._pending = 0

    def register(self) -> None:
        self._registered += 1
        self._pending += 1

    def backward_done(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """After one registered call's backward added its part: ``(dW_in, dW_out)`` when it was the last of this
        pass (the sums, handed over), else ``(None, None)``."""
        self._pending -= 1
        if self._pending:
            return None, None
        sums, self.sums, self._pending = self.sums, GradSums(), self._registered
        return sums.d_w_in, sums.d_w_out


class _ExpertFFN(torch.autograd.Function):
    # The passes themselves are the backend's (``ffn_forward`` / ``ffn_backward`` of moe_ep.expert_backend).
    @staticmethod
    def forward(ctx, x_SH, row_R, counts_E, weight_R, w_in, w_out, ops, activation, keep_pre, shared):
        with record_function(EXPERTS_LABEL):
            y_SH, h_RJ = ops.ffn_forward(x_SH, row_R, counts_E, weight_R, w_in, w_out, activation, keep_pre)
        ctx.save_for_backward(x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ)
        ctx.ops, ctx.activation, ctx.shared = ops, activation, shared
        if shared is not None:
            shared.register()
        return y_SH

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_SH):
        with autocast_off(dy_SH.device.type), record_function(EXPERTS_LABEL + ".backward"):
            x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ = ctx.saved_tensors
            need_x, _, _, need_weight, need_w_in, need_w_out = ctx.needs_input_grad[:6]
            shared = ctx.shared
            d_x, d_weight, d_w_in, d_w_out = ctx.ops.ffn_backward(
                dy_SH, x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ, ctx.activation,
                (need_x, need_weight, need_w_in, need_w_out), None if shared is None else shared.sums)
            if shared is not None:
                d_w_in, d_w_out = shared.backward_done()
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
        shared_grads: sum the weight gradients with those of the other calls sharing it (``SharedWeightGrads``).
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
    ops = grouped_ops(backend, x_SH, row_R.numel(), w_in, w_out)
    backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (x_SH, weight_R, w_in, w_out))
    with autocast_off(x_SH.device.type):
        return _ExpertFFN.apply(x_SH, row_R, counts_E, weight_R, w_in, w_out, ops, activation,
                                backward_follows and not recompute, shared_grads if backward_follows else None)


