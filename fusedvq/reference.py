"""Pure-PyTorch masked MSE: the CPU backend, and the readable statement of the math.

    x [B, D] features, r [B, K] target, index [K] (values in [0, D)), shift [K] = μ, scale [K] = 1/σ
    x̃ = nan_to_num(x) if nan_to_num else x                         (NaN, ±Inf → 0)
    z[b, k] = (x̃[b, index[k]] − shift[k]) · scale[k]                 (norm="none": z = x̃[:, index])
    diff = z − r;  e = diff²;  loss = Σe/(B·K) | Σe | e             (reduction mean | sum | none)

    ∂loss/∂r[b, k]        = −2·g[b, k]·diff[b, k]                   g = grad_out/(B·K) | grad_out | grad_out[b, k]
    ∂loss/∂x[b, d]        = Σ_{k : index[k] = d} 2·g[b, k]·diff[b, k]·scale[k]   (0 where x was non-finite)

Gradients are analytic (a hand-written backward), so training on the CPU never materializes the [B, D]
normalized features that autograd through the plain composition would. Everything is computed in float32
(float64 for float64 inputs) and cast once to the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from .contract import REDUCTION_MEAN, REDUCTION_NONE, compute_dtype


def masked_mse_forward(
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64
    shift: Optional[torch.Tensor],  # [K] compute dtype, or None (norm="none")
    scale: Optional[torch.Tensor],  # [K] compute dtype, or None (norm="none")
    nan_to_num: bool,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns (loss, diff [B, K] in compute dtype, finite [B, K] bool or None), the last two for backward."""
    cdt = compute_dtype(x.dtype)
    # index_select makes a fresh contiguous [B, K] buffer that every step below updates in place.
    diff = x.index_select(1, index)
    if diff.dtype != cdt:
        diff = diff.to(cdt)
    finite = None
    if nan_to_num:
        finite = torch.isfinite(diff)
        diff.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if scale is not None:
        # (x − μ)/σ as one fused multiply-add: x·(1/σ) + (−μ/σ).
        torch.addcmul(-shift * scale, diff, scale, out=diff)
    diff.sub_(target)
    return _reduce_squares(diff, reduction).to(x.dtype), diff, finite


def _reduce_squares(diff: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == REDUCTION_NONE:
        return diff.square()
    # Row dot products (K terms each) then a pairwise sum over rows: one pass, and accurate in float32
    # where a single dot over B·K terms drifts by ~1e-5 relative at B·K ~ 4M.
    total = torch.linalg.vecdot(diff, diff).sum()
    if reduction == REDUCTION_MEAN:
        total = total / diff.numel()
    return total


def masked_mse_backward(
    grad_loss: torch.Tensor,  # [] or [B, K] (reduction="none")
    diff: torch.Tensor,  # [B, K] compute dtype, from the forward
    finite: Optional[torch.Tensor],  # [B, K] bool or None
    index: torch.Tensor,  # [K] int64
    scale: Optional[torch.Tensor],  # [K] or None
    num_features: int,
    reduction: int,
    x_dtype: torch.dtype,
    target_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x [B, D] in x_dtype, grad_target [B, K] in target_dtype)."""
    cdt = diff.dtype
    g = grad_loss.to(cdt)
    if reduction == REDUCTION_MEAN:
        g = g * (2.0 / diff.numel())
    else:
        g = g * 2.0
    # dz = ∂loss/∂z = 2·g·diff, [B, K]; grad_target = −dz.
    if reduction == REDUCTION_NONE:
        dz = g.mul_(diff)
        grad_target = torch.neg(dz).to(target_dtype)
        grad_xk = dz.mul_(scale) if scale is not None else dz
    else:
        grad_target = torch.mul(diff, -g).to(target_dtype)
        grad_xk = diff * (g * scale if scale is not None else g)
    if finite is not None:
        grad_xk.mul_(finite)
    return scatter_columns(grad_xk, index, num_features, x_dtype), grad_target


def scatter_columns(
    grad_xk: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64
    num_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """grad_x [B, D] with grad_x[:, d] = Σ_{k : index[k] = d} grad_xk[:, k]; zero in the dropped columns."""
    grad_x = grad_xk.new_zeros(grad_xk.shape[0], num_features)
    grad_x.index_add_(1, index, grad_xk)
    return grad_x.to(dtype)
