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


def up_projection_reference(x_src, row_index, counts: list[int], w_in, activation: str, row_scale=None):
    """float64 ``(a, h)``: ``h = x_src[row_index] @ w_in[e]``, ``a = row_scale * act(h)`` (differentiable)."""
    h = grouped_mm_reference(x_src.double()[row_index.long()], w_in, counts)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        a = F.gelu(h)
    return (a if row_scale is None else row_scale.double()[:, None] * a), h
