"""Fixtures of the benchmarks under pytest-benchmark (bench/test_bench_loss.py says what runs where)."""

import pytest
import torch

from fusedvq.tools import benchmark as fb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    """CUDA when there is one, else the CPU."""
    return DEVICE


@pytest.fixture(scope="session")
def copy_rate(device):
    """The device's copy bandwidth (bytes/s), to put GB/s in proportion on CUDA; None on the CPU."""
    return fb.copy_bandwidth(device) if device == "cuda" else None
