"""Where the kernels run: is Triton importable, and is it in interpreter mode.

Nothing here imports Triton at module import time, so ``moe_ep.kernels`` stays
importable on machines without Triton; the kernels call :func:`require_triton`
before they first touch it.
"""
import importlib
import os


def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Read at call time, not cached: the interpreter's bf16/fp16 ``tl.dot`` is inexact,
    so launchers use this to ask the kernels to upcast dot operands to fp32.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_triton() -> None:
    """Raise a RuntimeError that says how to fix a missing Triton."""
    if not triton_available():
        raise RuntimeError(
            "moe_ep.kernels needs Triton for its kernels, but `import triton` "
            "fails here; install it with `pip install triton` (or the `moe_ep[triton]` extra)."
        )
