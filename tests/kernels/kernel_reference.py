"""Float64 per-expert loop references for the kernel tests."""
import torch
import torch.nn.functional as F


def expert_slices(counts: list[int]) -> list[slice]:
    """Row slice of each expert for rows sorted by expert."""
    slices, start = [], 0
    for count in counts:
        slices.append(slice(start, start + count))
        start += count
    return slices


def grouped_mm_reference(x_TK: torch.Tensor, w_EKN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """out[rows_e] = x[rows_e] @ w[e] in float64 (differentiable)."""
    x_TK, w_EKN = x_TK.double(), w_EKN.double()
    parts = [x_TK[rows] @ w_EKN[e] for e, rows in enumerate(expert_slices(counts))]
    return torch.cat(parts) if parts else x_TK.new_zeros((0, w_EKN.shape[2]))


def swiglu_ffn_reference(x_src, row_index, counts: list[int], w_gate_up, w_down, row_weight):
    """Unfused float64 SwiGLU expert FFN: row_weight * (silu(g) * u) @ w_down (differentiable)."""
    inter = w_down.shape[1]
    x_RH = x_src.double()[row_index.long()]
    gu = grouped_mm_reference(x_RH, w_gate_up, counts)
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    return row_weight.double()[:, None] * grouped_mm_reference(h, w_down, counts)
