"""Test-wide set-up, shared by tests/ and bench/.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported: hence here, before any test module imports fusedvq.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
