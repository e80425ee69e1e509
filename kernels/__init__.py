"""Triton grouped-GEMM kernels for expert-parallel MoE (installed as ``moe_ep.kernels``).

Importing this package never imports Triton; :func:`triton_available` says whether
it can be used, and the kernels raise a RuntimeError when it cannot.

* :func:`grouped_mm` — ``out[r] = x[r] @ w[expert(r)]`` for expert-sorted rows, differentiable.
* :func:`grouped_gemm`, :func:`weight_grad` — the same product and ``dW[e] = x_e^T dy_e`` without autograd.
* :func:`gathered_up_projection` — gather on load + grouped GEMM + SwiGLU/GELU + row scale, one launch
  (the forward of ``moe_ep.expert_ffn`` on the Triton backend); :func:`gathered_grouped_gemm` — the
  same gathered GEMM without epilogue (its recomputation).
"""
from .block_table import BlockConfig
from .gathered_gemm import gathered_grouped_gemm, gathered_up_projection
from .grouped_mm import grouped_gemm, grouped_mm, weight_grad
from .runtime import triton_available

__all__ = ["BlockConfig", "gathered_grouped_gemm", "gathered_up_projection", "grouped_gemm", "grouped_mm",
           "triton_available", "weight_grad"]
