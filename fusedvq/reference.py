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


# ------------------------------------------------------------------------------------ norm="batch"
#
# Batch statistics of the kept columns (over all ranks when synchronized), N rows in all:
#     μ[k] = mean_b x̃[b, index[k]],  σ[k] = sqrt(M2[k] / (N − 1)),  σ'[k] = 1 if σ[k] < eps else σ[k]
#     z = nan_to_num((x̃[:, index] − μ) / σ'),  diff = z − r,  e = diff²
# Held as stats [4, K] = (μ, 1/σ', w, 1/N) with w = 1/(N − 1), or 0 where σ' = 1 (no gradient through σ);
# N < 2 leaves σ undefined and is treated as σ' = 1. The backward is batch norm's (m = the finite-z mask):
#     dz = 2·g·diff·m,  S1 = Σ_b dz,  S2 = Σ_b dz·z                   (sums over all N rows)
#     ∂L/∂x̃[b, index[k]] += (1/σ')·(dz − S1/N − z·S2·w),   ∂L/∂r = −2·g·diff
# For reduction mean/sum g is one number, so S1 = 2g·A1 and S2 = 2g·A2 with column sums A = (Σ diff·m,
# Σ diff·m·z) that the forward already computes: the backward then needs no reduction of its own.

STAT_MEAN, STAT_RSTD, STAT_W, STAT_INV_N = range(4)


def column_moments(xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [K], M2 [K]) of xk [B, K] over its rows, two-pass; zeros for B = 0."""
    if xk.shape[0] == 0:
        zeros = xk.new_zeros(xk.shape[1])
        return zeros, zeros.clone()
    mean = xk.mean(0)
    return mean, (xk - mean).square_().sum(0)


def finalize_batch_stats(count, mean: torch.Tensor, m2: torch.Tensor, eps: float) -> torch.Tensor:
    """stats [4, K] = (μ, 1/σ', w, 1/N) from N rows' (mean, M2); count is an int or a 0-d tensor."""
    n = torch.as_tensor(count, dtype=mean.dtype, device=mean.device)
    sigma = torch.sqrt(m2 / (n - 1).clamp_min(1))
    flat = (sigma < eps) | (n < 2)  # σ' = 1 and no gradient through σ
    rstd = torch.where(flat, torch.ones_like(sigma), sigma.reciprocal())
    w = torch.where(flat, torch.zeros_like(sigma), (n - 1).clamp_min(1).reciprocal().expand_as(sigma))
    inv_n = n.clamp_min(1).reciprocal().expand_as(sigma)
    return torch.stack([mean, rstd, w, inv_n])


def _gather_finite(x, index, nan_to_num):
    xk = x.index_select(1, index).to(compute_dtype(x.dtype))
    finite = None
    if nan_to_num:
        finite = torch.isfinite(xk)
        xk.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return xk, finite


def _normalized(xk, stats):
    z = (xk - stats[STAT_MEAN]) * stats[STAT_RSTD]
    z_ok = torch.isfinite(z)
    return z.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), z_ok


def batch_mse_forward(
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64
    eps: float,
    nan_to_num: bool,
    reduction: int,
    merge_and_finalize=None,  # (count, mean, M2) -> stats [4, K] over all ranks; None: this batch only
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats [4, K], column sums [2, K]) in the compute dtype (loss in x.dtype)."""
    xk, _ = _gather_finite(x, index, nan_to_num)
    mean, m2 = column_moments(xk)
    if merge_and_finalize is not None:
        stats = merge_and_finalize(xk.shape[0], mean, m2)
    else:
        stats = finalize_batch_stats(xk.shape[0], mean, m2, eps)
    z, z_ok = _normalized(xk, stats)
    diff = z.sub(target)
    masked = diff * z_ok
    colsums = torch.stack([masked.sum(0), (masked * z).sum(0)])
    if diff.shape[0] == 0:  # a rank with no rows contributes nothing (and no NaN)
        loss = diff.new_zeros(diff.shape if reduction == REDUCTION_NONE else ())
        return loss.to(x.dtype), stats, colsums
    return _reduce_squares(diff, reduction).to(x.dtype), stats, colsums


def batch_mse_backward(
    grad_loss: torch.Tensor,  # [] or [B, K]
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K]
    stats: torch.Tensor,  # [4, K] from the forward
    colsums: torch.Tensor,  # [2, K] from the forward
    nan_to_num: bool,
    reduction: int,
    sum_over_ranks=None,  # [2, K] -> [2, K] summed over all ranks; None: this batch only
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [B, D] in x.dtype, grad_target [B, K] in target.dtype)."""
    xk, finite = _gather_finite(x, index, nan_to_num)
    z, z_ok = _normalized(xk, stats)
    diff = z - target
    B, K = diff.shape
    g = grad_loss.to(diff.dtype)
    g = g * (2.0 / max(B * K, 1)) if reduction == REDUCTION_MEAN else g * 2.0
    dz = g * diff * z_ok  # [B, K]
    if reduction == REDUCTION_NONE:
        sums = torch.stack([dz.sum(0), (dz * z).sum(0)])
    else:
        sums = colsums * g
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums)
    s1, s2 = sums
    grad_xk = (dz - s1 * stats[STAT_INV_N] - z * (s2 * stats[STAT_W])) * stats[STAT_RSTD]
    if finite is not None:
        grad_xk.mul_(finite)
    grad_target = (diff * (-g)).to(target.dtype)
    return scatter_columns(grad_xk, index, x.shape[1], x.dtype), grad_target
