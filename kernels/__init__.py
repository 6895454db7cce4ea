"""Triton kernels for fusedvq (installed as fusedvq.kernels). Importing this package needs triton."""

from .masked_mse import masked_mse_backward, masked_mse_forward

__all__ = ["masked_mse_forward", "masked_mse_backward"]
