"""moe_ep.kernels imports without Triton and its kernels then raise a clear RuntimeError."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

_SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from moe_ep.kernels.grouped_mm import grouped_mm
from moe_ep.kernels.runtime import triton_available
assert not triton_available()
x, w, counts = torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([1, 3])
try:
    grouped_mm(x, w, counts)
except RuntimeError as err:
    assert "Triton" in str(err), err
else:
    raise AssertionError("grouped_mm ran without Triton")
assert "triton" not in {name.split(".")[0] for name, mod in sys.modules.items() if mod is not None}
print("ok")
"""


def test_import_and_clear_error_without_triton():
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
