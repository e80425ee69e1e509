"""Shared test setup: every test starts from the same RNG state, on CPU, single-threaded-deterministic."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
