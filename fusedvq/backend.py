"""Which implementation runs a call: the Triton kernels (CUDA tensors, or CPU tensors under Triton's
interpreter) or the PyTorch path, from the `backend` option and the features; errors say why Triton cannot
run where it was asked for."""

from __future__ import annotations

import importlib.util
import os

import torch

from .canonical import option_code
from .contract import BACKENDS, REFERENCE_DTYPES, TRITON_DTYPES


# Looked up once, without importing triton (slow, and not wanted on CPU-only installs).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton_for(backend: str, features: torch.Tensor) -> bool:
    """Resolve backend ("auto", "triton", "reference") for these features; errors say why Triton can't run."""
    option_code("backend", backend, BACKENDS)
    if backend == "reference":
        if features.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"features dtype {features.dtype} is not supported")
        return False
    if backend == "auto":
        return features.is_cuda and features.dtype in TRITON_DTYPES and triton_importable()
    if features.dtype not in TRITON_DTYPES:
        raise TypeError(
            f'backend="triton" supports float32, float16 and bfloat16, got {features.dtype} '
            f'(use backend="reference" for float64)'
        )
    if not triton_importable():
        raise RuntimeError('backend="triton" needs triton, which is not installed: pip install "fusedvq[triton]"')
    if not features.is_cuda and not triton_interpreting():
        raise RuntimeError(
            f'backend="triton" needs CUDA tensors (features are on {features.device}); to run the kernels on '
            f"the CPU, set TRITON_INTERPRET=1 before triton is imported"
        )
    return True
