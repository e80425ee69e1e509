"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter (see tests/conftest.py)."""
import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
