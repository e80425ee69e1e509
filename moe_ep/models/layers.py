"""Dense building blocks of the language model: RMSNorm, RoPE attention, SwiGLU FFN.

Shapes: ``B`` batch, ``S`` sequence, ``H`` hidden, ``N`` heads, ``D`` head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..half_matmul import Linear


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for positions ``[0, max_seq_len)``.

    Rotation pairs dimension ``i`` with ``i + D/2`` (the "rotate half" layout).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_SF = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles_SD = torch.cat([angles_SF, angles_SF], dim=-1)
        self.register_buffer("cos_SD", angles_SD.cos().float(), persistent=False)
        self.register_buffer("sin_SD", angles_SD.sin().float(), persistent=False)

    def forward(self, x_BNSD: torch.Tensor) -> torch.Tensor:
        S = x_BNSD.shape[-2]
        if S > self.cos_SD.shape[0]:
            raise ValueError(f"RotaryEmbedding: sequence length {S} exceeds max_seq_len {self.cos_SD.shape[0]}")
        cos, sin = self.cos_SD[:S].to(x_BNSD.dtype), self.sin_SD[:S].to(x_BNSD.dtype)
        first, second = x_BNSD.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return x_BNSD * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys.

    ``forward(x)`` uses torch SDPA and returns ``(out, None)``.
    ``forward(x, output_attentions=True)`` computes the same attention with an
    explicit softmax, ``P = softmax(q k^T / sqrt(D) + causal mask)`` in fp32,
    and returns ``(out, P_BNSS)`` (rows sum to 1, zeros above the diagonal).
    """

    def __init__(self, hidden_size: int, n_heads: int, max_seq_len: int, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = hidden_size // n_heads
        self.qkv_proj = Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = Linear(hidden_size, hidden_size, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def forward(self, x_BSH: torch.Tensor,
                output_attentions: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, S, H = x_BSH.shape
        q, k, v = self.qkv_proj(x_BSH).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q), self.rope(k)
        if not output_attentions:
            out_BNSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out_BNSD.transpose(1, 2).reshape(B, S, H)), None
        scores_BNSS = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim ** -0.5
        future_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSH.device).triu(1)
        probs_BNSS = scores_BNSS.masked_fill(future_SS, float("-inf")).softmax(dim=-1)
        out_BNSD = (probs_BNSS @ v.float()).to(v.dtype)
        return self.o_proj(out_BNSD.transpose(1, 2).reshape(B, S, H)), probs_BNSS


class DenseFFN(nn.Module):
    """SwiGLU FFN ``down(silu(gate(x)) * up(x))`` (the dense layers of DeepSeek models)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
