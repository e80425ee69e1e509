"""The kernels never read counts on the host: no .item()/.tolist()/int() on the hot path.

The one exception is on CPU: ``gathered_gemm``'s operand checks read their
verdict there (``_require``; free without a device), while on CUDA they are
device-side asserts, which the sync debug mode below proves.
"""
import contextlib
import sys

import pytest
import torch

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytest.importorskip("triton", reason="moe_ep.kernels needs Triton (pip install triton)")

from moe_ep.kernels.block_table import BlockConfig  # noqa: E402
from moe_ep.kernels.gathered_gemm import _require, gathered_up_projection  # noqa: E402
from moe_ep.kernels.grouped_mm import grouped_mm  # noqa: E402

pytestmark = pytest.mark.timeout(60)

CONFIG = BlockConfig(block_m=32, block_n=32, block_k=32)


@contextlib.contextmanager
def _no_host_reads(device: torch.device):
    """On CUDA any synchronising call raises; on CPU host reads of tensor values raise."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return

    def forbid(name):
        read = getattr(torch.Tensor, name)

        def forbidden(*args, **kwargs):
            if name == "__bool__" and sys._getframe(1).f_code is _require.__code__:
                return read(*args, **kwargs)  # the CPU operand check (module docstring)
            raise AssertionError("host read of a tensor value on the kernel path")
        return forbidden

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "__int__", "__float__", "__bool__"):
            patch.setattr(torch.Tensor, name, forbid(name))
        yield


def test_grouped_mm_forward_and_backward(device):
    counts_E = torch.tensor([5, 0, 20, 7], device=device)
    x_TK = torch.randn(32, 24, device=device, requires_grad=True)
    w_EKN = torch.randn(4, 24, 16, device=device, requires_grad=True)
    dy_TN = torch.randn(32, 16, device=device)
    with _no_host_reads(device):
        grouped_mm(x_TK, w_EKN, counts_E, config=CONFIG).backward(dy_TN)
    assert x_TK.grad is not None and w_EKN.grad is not None


def test_gathered_up_projection(device):
    counts_E = torch.tensor([5, 0, 20, 7], device=device)
    x_src = torch.randn(40, 24, device=device)
    row_index = torch.randperm(40, device=device)[:32]
    w_in = torch.randn(4, 24, 32, device=device)
    row_weight = torch.rand(32, device=device)
    with _no_host_reads(device):
        out, pre = gathered_up_projection(x_src, row_index, counts_E, w_in, "swiglu", row_weight, store_pre=True,
                                          config=CONFIG)
    assert out.shape == (32, 16) and pre.shape == (32, 32)
