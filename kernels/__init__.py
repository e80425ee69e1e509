"""Triton grouped-GEMM kernels for expert-parallel MoE (installed as ``moe_ep.kernels``).

Importing this package never imports Triton; :func:`triton_available` says whether
it can be used, and the kernels raise a RuntimeError when it cannot.

* :func:`grouped_mm` — ``out[r] = x[r] @ w[expert(r)]`` for expert-sorted rows, differentiable.
* :func:`fused_swiglu_ffn` — gather + SwiGLU + gate-weighted down projection, differentiable.
"""
from .block_table import BlockConfig
from .fused_expert_ffn import fused_swiglu_ffn
from .grouped_mm import grouped_mm
from .runtime import triton_available

__all__ = ["BlockConfig", "fused_swiglu_ffn", "grouped_mm", "triton_available"]
