"""Triton kernels for fusedvq (installed as fusedvq.kernels). Importing this package needs triton."""

from .batch_stats import batch_mse_backward, batch_mse_forward
from .masked_mse import masked_mse_backward, masked_mse_forward

__all__ = ["masked_mse_forward", "masked_mse_backward", "batch_mse_forward", "batch_mse_backward"]
