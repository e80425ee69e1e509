"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels; moe_ep.kernels
imports Triton only on first launch, so setting it here (at collection) is early
enough. It is set only when no GPU is visible and never overrides an explicit value.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
