"""fused_swiglu_ffn: an expert SwiGLU FFN over gathered rows in two fused grouped GEMMs.

For sorted row ``r`` of expert ``e`` (``counts`` rows per expert, in order):

    x_r   = x_src[row_index[r]]                                   (gathered on load)
    g, u  = x_r @ w_gate_up[e][:, :I],  x_r @ w_gate_up[e][:, I:]
    h_r   = silu(g) * u                                           (up-projection epilogue)
    out_r = row_weight[r] * (h_r @ w_down[e])                     (down-projection epilogue)

Forward: two launches of the grouped-GEMM kernel; the sorted copy of ``x_src`` and
the [R, 2I] pre-activations are never materialised, and the gate weight costs no
extra pass over [R, H]. Backward recomputes the pre-activations with the unfused
grouped GEMM and uses the grouped-GEMM / weight-gradient kernels plus torch ops:

    dS   = dOut @ w_down[e]^T                      d row_weight_r = <dS_r, h_r>
    dh   = row_weight * dS                         dw_down[e] = h_e^T @ (row_weight * dOut)_e
    dg   = dh * u * silu'(g),  du = dh * silu(g)   dw_gate_up[e] = x_e^T @ [dg, du]_e
    dx_src = index_add over row_index of [dg, du] @ w_gate_up[e]^T
"""
import torch
from torch.autograd.function import once_differentiable

from .block_table import BlockConfig, choose_config
from .grouped_mm import check_counts, grouped_gemm, weight_grad
from .runtime import triton_kernels


def _check_operands(x_src, row_index, counts, w_gate_up, w_down, row_weight) -> None:
    num_experts, hidden, two_inter = w_gate_up.shape
    if x_src.dim() != 2 or x_src.shape[1] != hidden or two_inter % 2:
        raise ValueError(f"expected x_src [S, H] and w_gate_up [E, H, 2I], got {tuple(x_src.shape)} "
                         f"and {tuple(w_gate_up.shape)}")
    if w_down.shape != (num_experts, two_inter // 2, hidden):
        raise ValueError(f"w_down must be [E, I, H] = {(num_experts, two_inter // 2, hidden)}, got {tuple(w_down.shape)}")
    if row_index.dim() != 1 or row_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"row_index must be a 1-D int32/int64 tensor, got {row_index.dtype} {tuple(row_index.shape)}")
    if row_weight.shape != row_index.shape or row_weight.dtype != torch.float32:
        raise TypeError(f"row_weight must be float32 shaped like row_index {tuple(row_index.shape)}, got "
                        f"{row_weight.dtype} {tuple(row_weight.shape)}")
    if x_src.dtype not in (torch.float32, torch.bfloat16, torch.float16) or \
            w_gate_up.dtype != x_src.dtype or w_down.dtype != x_src.dtype:
        raise TypeError(f"x_src, w_gate_up and w_down must share a float dtype, got "
                        f"{x_src.dtype}, {w_gate_up.dtype}, {w_down.dtype}")
    for name, tensor in (("row_index", row_index), ("w_gate_up", w_gate_up), ("w_down", w_down),
                         ("row_weight", row_weight)):
        if tensor.device != x_src.device:
            raise ValueError(f"{name} is on {tensor.device} but x_src is on {x_src.device}")
    check_counts(counts, num_experts, x_src.device)


def _swiglu_forward(x_src, row_index, counts, w_gate_up, w_down, row_weight, config):
    """The two fused launches; returns out [R, H]."""
    kernels = triton_kernels()
    rows, (num_experts, hidden, two_inter) = row_index.shape[0], w_gate_up.shape
    inter = two_inter // 2
    up_cfg = config or choose_config(rows, num_experts, hidden, inter, x_src.dtype, accumulators=2)
    down_cfg = config or choose_config(rows, num_experts, inter, hidden, x_src.dtype)
    h_RI = kernels.launch_grouped_gemm(x_src, w_gate_up, counts, x_src.new_empty((rows, inter)), up_cfg,
                                       row_index=row_index, swiglu=True)
    return kernels.launch_grouped_gemm(h_RI, w_down, counts, x_src.new_empty((rows, hidden)), down_cfg,
                                       row_scale=row_weight)


class _FusedSwiGLUFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_src, row_index, counts, w_gate_up, w_down, row_weight, config):
        ctx.save_for_backward(x_src, row_index, counts, w_gate_up, w_down, row_weight)
        ctx.config = config
        return _swiglu_forward(x_src, row_index, counts, w_gate_up, w_down, row_weight, config)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_RH):
        x_src, row_index, counts, w_gate_up, w_down, row_weight = ctx.saved_tensors
        config, dtype = ctx.config, x_src.dtype
        inter = w_down.shape[1]
        scale_R1 = row_weight[:, None]

        x_RH = x_src.index_select(0, row_index)
        gu_RI2 = grouped_gemm(x_RH, w_gate_up, counts, config).float()
        gate_RI, up_RI = gu_RI2[:, :inter], gu_RI2[:, inter:]
        sig_RI = torch.sigmoid(gate_RI)
        silu_RI = gate_RI * sig_RI
        h_RI = (silu_RI * up_RI).to(dtype)

        ds_RI = grouped_gemm(dout_RH, w_down.transpose(1, 2), counts, config).float()
        d_row_weight = (ds_RI * h_RI.float()).sum(dim=1)
        dh_RI = ds_RI * scale_R1
        dgu_RI2 = torch.cat([dh_RI * up_RI * sig_RI * (1 + gate_RI * (1 - sig_RI)), dh_RI * silu_RI], dim=1).to(dtype)

        d_w_down = weight_grad(h_RI, (dout_RH.float() * scale_R1).to(dtype), counts, w_down, config)
        d_w_gate_up = weight_grad(x_RH, dgu_RI2, counts, w_gate_up, config)
        dx_RH = grouped_gemm(dgu_RI2, w_gate_up.transpose(1, 2), counts, config)
        dx_src = torch.zeros_like(x_src).index_add_(0, row_index, dx_RH)
        return dx_src, None, None, d_w_gate_up, d_w_down, d_row_weight, None


def fused_swiglu_ffn(x_src: torch.Tensor, row_index: torch.Tensor, counts: torch.Tensor,
                     w_gate_up: torch.Tensor, w_down: torch.Tensor, row_weight: torch.Tensor, *,
                     config: BlockConfig | None = None) -> torch.Tensor:
    """Gate-weighted SwiGLU expert FFN of gathered rows; returns [R, H] in x_src's dtype.

    Args:
        x_src: [S, H] receive buffer in any row order.
        row_index: [R] int32/int64; sorted row ``r`` reads ``x_src[row_index[r]]``.
        counts: [E] int32/int64 rows per expert on the device (sum == R, not checked).
        w_gate_up: [E, H, 2I]; columns [0, I) are the gate, [I, 2I) the up projection.
        w_down: [E, I, H].
        row_weight: [R] float32 gate weight of each sorted row.
        config: tile sizes for every launch; default from ``block_table.choose_config``.

    Differentiable in x_src, w_gate_up, w_down and row_weight. Needs Triton.
    """
    _check_operands(x_src, row_index, counts, w_gate_up, w_down, row_weight)
    return _FusedSwiGLUFFN.apply(x_src, row_index, counts, w_gate_up, w_down, row_weight, config)
