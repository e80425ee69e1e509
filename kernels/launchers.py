"""The Triton launchers, imported on first use (``runtime`` stays free of Triton and of this import)."""
from .runtime import require_triton


def triton_launchers():
    """``grouped_gemm_triton``, the module holding the Triton kernels and their launchers."""
    require_triton()
    from . import grouped_gemm_triton

    return grouped_gemm_triton
