"""Shared test setup: every test starts from the same RNG state.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET
must be set before Triton decorates them, and ``moe_ep.kernels`` imports Triton
only on first launch, so setting it here (at collection) is early enough. It is
never overridden when set explicitly, and spawned workers inherit it.
"""
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def bench_modules(monkeypatch):
    """benchmarks/ on sys.path for this test (spawned ranks inherit it): import its scripts as modules."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
