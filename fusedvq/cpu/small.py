"""norm="batch" on the CPU for small batches (B·K up to SMALL_ELEMENTS, this batch's own statistics): batch.py's
math and contract (stats [5, K] = (c, m, 1/σ', w, 1/N), column sums A [2, K]) in one block of plain tensor
ops, none of the blocked passes' machinery (row blocks, warm scratch, finiteness probes), which at B = 4
costs more than the arithmetic. Its backward is batch norm's VJP written out — about 20 small ops against
the ~40 that autograd runs through the plain composition (var_mean, sqrt, masked_fill, two nan_to_num, ...),
which is what makes the VQ-led step at B = 4 cheaper than the plain fix.

    forward   x̃ = nan_to_num(x[:, index]), c = x̃[0], (σ², m) = var_mean(x̃ − c), σ' = 1 where σ < eps,
              z = nan_to_num((x̃ − c − m)/σ'), diff = z − r, loss = mse
    backward  dz = 2·g·diff·[z finite],  S1 = Σ_b dz, S2 = Σ_b dz·z   (mean/sum: S = 2g·A of the forward)
              ∂L/∂x̃ = (1/σ')·(dz − S1/N − z·S2·w)·[x finite],  ∂L/∂r = −2·g·diff
The backward recomputes x̃ and z from x and the statistics (a few ops on [B, K]): nothing batch-sized is saved.
"""

from __future__ import annotations

import math

import torch

from ..kernels.plan import COMPUTE_DTYPE, REDUCTION_COLUMN, REDUCTION_MEAN, REDUCTION_NONE, Mode
from .batch import STAT_INV_N, STAT_MEAN, STAT_RSTD, STAT_SHIFT, STAT_W, _neg_cast, finalize_batch_stats
from .stats import grad_factors, into_target, new_target_grad, reduce_columns

# Up to this many [B, K] elements the one-block path below wins over the blocked passes (measured: B = 4 to
# 64 at K = 171); above it, fresh batch-sized temporaries cost more than blocks in warm scratch.
SMALL_ELEMENTS = 1 << 14


def _features(x: torch.Tensor, index: torch.Tensor, nan_to_num: bool):
    """(x̃ [B, K] in the compute dtype, its finite mask or None)."""
    xk = x.index_select(1, index)
    cdt = COMPUTE_DTYPE[x.dtype]
    xk = xk.to(cdt) if xk.dtype != cdt else xk
    return _finite(xk) if nan_to_num else (xk, None)


def _normalized(xk: torch.Tensor, stats: torch.Tensor):
    """(z, its finite mask): z = nan_to_num(((x̃ − c) − m)·(1/σ')), from the saved statistics."""
    return _finite(xk.sub_(stats[STAT_SHIFT]).sub_(stats[STAT_MEAN]).mul_(stats[STAT_RSTD]))


def _stats(xk: torch.Tensor, eps: float):
    """(stats [5, K], z before nan_to_num): the moments around c = x̃[0] (m = mean(x̃ − c), M2 = Σ (x̃ − c − m)²,
    as batch.py takes them; a sum, a dot and a few elementwise ops: var_mean costs as much as all of them at
    B = 4), and z = (x̃ − c − m)·(1/σ') from the same centered values."""
    c = xk[0]
    dev = xk - c
    m = dev.sum(0).mul_(1.0 / xk.shape[0])
    centered = dev.sub_(m)
    stats = finalize_batch_stats(xk.shape[0], c, m, torch.linalg.vecdot(centered, centered, dim=0), eps)
    return stats, centered.mul_(stats[STAT_RSTD])


def _finite(t: torch.Tensor):
    """(nan_to_num(t) in place, its finite mask), or (t, None) when every entry is finite: NaN and ±Inf
    propagate into a sum (an overflowing sum only takes the exact path), and on the CPU asking is cheap,
    where isfinite costs three ops."""
    if math.isfinite(float(t.sum())):
        return t, None
    ok = t.isfinite()
    return t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), ok


def batch_mse_forward(x, target, index, eps: float, mode: Mode, merge_and_finalize=None, weight=None):
    """(loss in x.dtype, stats [5, K], column sums A [2, K] ([0, K] for reduction "none")): batch.py's."""
    xk, _ = _features(x, index, mode.nan_to_num)
    stats, z = _stats(xk, eps)
    z, z_ok = _finite(z)
    diff = into_target(torch.sub, z, torch.empty_like(z), mode.gap, target)
    if mode.reduction == REDUCTION_NONE:
        e = diff.square() if weight is None else diff.square().mul_(weight)
        return e.to(x.dtype), stats, stats.new_zeros((0, z.shape[1]))
    colsums = torch.stack([(diff if z_ok is None else diff * z_ok).sum(0), torch.linalg.vecdot(diff, z, dim=0)])
    if mode.reduction == REDUCTION_COLUMN or weight is not None:
        loss = reduce_columns(torch.linalg.vecdot(diff, diff, dim=0), x.shape[0], mode.reduction, weight)
    else:
        loss = torch.linalg.vecdot(diff.view(-1), diff.view(-1))
        loss = loss / diff.numel() if mode.reduction == REDUCTION_MEAN else loss
    return loss.to(x.dtype), stats, colsums


def batch_mse_backward(grad_loss, x, target, index, saved: tuple, mode: Mode, sum_over_ranks=None, weight=None):
    """(grad_x, grad_target), None where not wanted: batch.py's contract."""
    stats, colsums = saved
    B, K = x.shape[0], index.shape[0]
    xk, x_ok = _features(x, index, mode.nan_to_num)
    z, z_ok = _normalized(xk, stats)
    none = mode.reduction == REDUCTION_NONE
    g, f = grad_factors(grad_loss, mode.reduction, B, K, weight, z.dtype)
    dz = into_target(torch.sub, z, torch.empty_like(z), mode.gap, target)
    dz = dz.mul_(g).mul_(f) if none else dz.mul_(f)  # 2·g·w·diff
    grad_target = None
    if mode.needs[1]:
        grad_target = new_target_grad(B, K, mode.gap, target.dtype, x.device)
        into_target(torch.neg if grad_target.dtype == dz.dtype else _neg_cast, dz, grad_target, mode.gap)
    if not mode.needs[0]:
        return None, grad_target
    if z_ok is not None:
        dz.mul_(z_ok)
    sums = torch.stack([dz.sum(0), torch.linalg.vecdot(dz, z, dim=0)]) if none else colsums * f
    return _grad_x(x, index, dz, z, x_ok, stats, sums), grad_target


def batch_clean_forward(x, index, eps: float, mode: Mode, merge_and_finalize=None):
    """(z [B, K] in x.dtype, stats [5, K])."""
    xk, _ = _features(x, index, mode.nan_to_num)
    stats, z = _stats(xk, eps)
    return _finite(z)[0].to(x.dtype), stats


def batch_clean_backward(grad_z, x, index, stats, mode: Mode, sum_over_ranks=None):
    """grad_x [B, D]: batch norm's VJP with dz = grad_z·[z finite]."""
    xk, x_ok = _features(x, index, mode.nan_to_num)
    z, z_ok = _normalized(xk, stats)
    dz = grad_z.to(z.dtype, copy=True) if z_ok is None else grad_z.to(z.dtype) * z_ok
    sums = torch.stack([dz.sum(0), torch.linalg.vecdot(dz, z, dim=0)])
    return _grad_x(x, index, dz, z, x_ok, stats, sums)


def _grad_x(x, index, dz, z, x_ok, stats, sums) -> torch.Tensor:
    """grad_x [B, D] in x.dtype: (1/σ')·(dz − S1/N − z·S2·w)·[x finite] added into the columns index names."""
    grad = dz.sub_(sums[0] * stats[STAT_INV_N]).sub_(z.mul_(sums[1] * stats[STAT_W])).mul_(stats[STAT_RSTD])
    if x_ok is not None:
        grad.mul_(x_ok)
    grad_x = grad.new_zeros((x.shape[0], x.shape[1]))
    grad_x.index_add_(1, index, grad)  # (in a fixed order on the CPU, duplicates adding up)
    return grad_x.to(x.dtype) if grad_x.dtype != x.dtype else grad_x
