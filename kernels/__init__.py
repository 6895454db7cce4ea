"""Triton kernels for fusedvq (installed as fusedvq.kernels). Importing this package needs triton."""

from .batch_stats import batch_clean_backward, batch_clean_forward, batch_mse_backward, batch_mse_forward
from .launchers import clean_backward, clean_forward, masked_mse_backward, masked_mse_forward

__all__ = [
    "masked_mse_forward", "masked_mse_backward", "batch_mse_forward", "batch_mse_backward",
    "clean_forward", "clean_backward", "batch_clean_forward", "batch_clean_backward",
]
