"""Names and integer codes shared by every layer (the op schema and the kernels take the codes)."""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")  # code = position: 0 none ([B, K]), 1 mean, 2 sum
NORMS = ("none", "stats", "batch")  # code = position
BACKENDS = ("auto", "triton", "reference")
STATS_SPACES = ("raw", "masked")

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2
NORM_NONE, NORM_STATS, NORM_BATCH = 0, 1, 2

# Dtypes each backend accepts for features and target (both must share one).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
