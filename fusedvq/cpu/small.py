"""norm="batch" on the CPU at small batches (B·K up to SMALL_ELEMENTS, this batch's own statistics, eager): the
loss and clean_features as two torch.autograd.Functions of a few plain tensor ops each, batch norm's VJP
written out. The routing point (ops/__init__.py) calls `loss` and `clean` directly: at B = 4 the registered
op's machinery, the blocked passes (batch.py) and a backward that recomputes z would cost more than the
arithmetic, and autograd through the plain composition runs about 40 small ops. Traced calls (torch.compile)
take the registered op, whose CPU implementation is batch.py: the same math, contract and results.

    forward   x̃ = x[:, index] in the compute dtype (nan_to_num: NaN, ±Inf → 0), c = x̃[0] (a shift from the
              data: a column constant within the batch gives m = M2 = 0 exactly, reference.py says why),
              m = mean_b (x̃ − c), M2 = Σ_b (x̃ − c − m)², σ = sqrt(M2/(B − 1)), σ' = 1 where σ < eps,
              z = nan_to_num((x̃ − c − m)/σ'), diff = z − r, loss = reduce(w·diff²)  (blocked.py's reduce_columns)
    backward  dz = ∂L/∂z·[z finite]  (the loss: 2·g·w·diff, blocked.py's grad_factors),
              S1 = Σ_b dz, S2 = Σ_b dz·z,
              ∂L/∂x̃ = (1/σ')·(dz − S1/B − z·S2·w')·[x finite]   (w' = 1/(B − 1), 0 where σ' = 1: no gradient
              through σ), added into the columns index names (duplicates add up),  ∂L/∂r = −2·g·w·diff
The forward saves z, diff and the [K] statistics through save_for_backward (B·K is small), so the backward
recomputes nothing; finite masks exist only when a sum says a tensor holds NaN or ±Inf (they propagate into
it). With create_graph=True the backward differentiates reference.py's composition instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..kernels.plan import COMPUTE_DTYPE, REDUCTION_COLUMN, REDUCTION_MEAN, REDUCTION_NONE
from . import autocast_enabled, without_autocast
from .batch import _neg_cast
from .blocked import grad_factors, into_target, new_target_grad, reduce_columns

# norm "none" / "stats" at a small batch: reference.py's composition with fewer ops. aten's mse_loss without
# F.mse_loss's Python checks (the shapes are checked before): a third of a B = 4 step's Python time otherwise.
_MSE_LOSS = torch._C._nn.mse_loss


def kept_plain(x: torch.Tensor, index: torch.Tensor, shift: Optional[torch.Tensor],
               scale: Optional[torch.Tensor]) -> torch.Tensor:
    """reference.normalized_kept's common case for the small-batch route (ops/__init__.py's SmallRoute: eager, outside torch.func, x
    in the compute dtype on the CPU, no nan_to_num): the same ops and bits, but the shift is subtracted from the
    gathered copy outside autograd — subtracting a constant changes no derivative of any order, and the
    gather's backward keeps nothing of its output — so autograd records two ops, not three: at B = 4 an op is
    about 2 µs of a 35 µs step."""
    xk = x.index_select(1, index)
    if scale is None:
        return xk
    xk.detach().sub_(shift)  # (in place through a detached alias: its version counter still counts the write)
    return xk * scale


def masked_mse_plain(x: torch.Tensor, target: torch.Tensor, index: torch.Tensor, shift: Optional[torch.Tensor],
                     scale: Optional[torch.Tensor], reduction: int) -> torch.Tensor:
    """reference.masked_mse_composed's common case for the small-batch route (kept_plain's conditions; no gap, no
    weight, reduction mean / sum / none): the same ops and bits, the general form's dtype and option checks
    (a µs of a B = 4 step) skipped."""
    return _MSE_LOSS(kept_plain(x, index, shift, scale), target, reduction)


# Up to this many [B, K] elements this path wins over the blocked passes (measured: B = 4 to 64 at K = 171);
# above it, fresh batch-sized temporaries cost more than blocks in warm scratch.
SMALL_ELEMENTS = 1 << 14


def loss(x: torch.Tensor, target: torch.Tensor, plan) -> torch.Tensor:
    """The norm="batch" loss of x [B, D] (B >= 2) against target [B, K (+ gap)] under `plan` (arguments.Plan),
    checked by the caller; in x's dtype."""
    return _BatchLoss.apply(x, target, plan)


def clean(x: torch.Tensor, plan) -> torch.Tensor:
    """clean_features with norm="batch": z [B, K] in x's dtype."""
    return _BatchClean.apply(x, plan)


def _normalize(x: torch.Tensor, index: torch.Tensor, eps: float, nan_to_num: bool):
    """(z [B, K] in the compute dtype, 1/σ' [K], flat [K] (σ' = 1), x's finite mask or None, z's or None)."""
    xk = x.index_select(1, index)
    cdt = COMPUTE_DTYPE[x.dtype]
    xk = xk.to(cdt) if xk.dtype != cdt else xk
    x_ok = None
    if nan_to_num and not _all_finite(xk):
        x_ok = xk.isfinite()
        xk.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    B = xk.shape[0]
    centered = xk - xk[0]
    centered.sub_(centered.sum(0).mul_(1.0 / B))
    sigma = torch.linalg.vecdot(centered, centered, dim=0).mul_(1.0 / (B - 1)).sqrt_()
    flat = sigma < eps
    rstd = sigma.reciprocal_().masked_fill_(flat, 1.0)
    z = centered.mul_(rstd)
    z_ok = None
    if not _all_finite(z):
        z_ok = z.isfinite()
        z.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return z, rstd, flat, x_ok, z_ok


def _all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN or ±Inf, by its sum (they propagate into it; an overflowing sum only takes the
    exact path): on the CPU one op and one read, where isfinite().all() costs two."""
    return math.isfinite(float(t.sum()))


def _batch_norm_vjp(x: torch.Tensor, index: torch.Tensor, dz: torch.Tensor, saved) -> torch.Tensor:
    """grad_x [B, D] in x.dtype from dz = ∂L/∂z [B, K] (overwritten): batch norm's VJP, masked, added into
    the columns index names."""
    z, rstd, flat, x_ok, z_ok = saved
    if z_ok is not None:
        dz.mul_(z_ok)
    B = dz.shape[0]
    s1 = dz.sum(0).mul_(1.0 / B)
    s2 = torch.linalg.vecdot(dz, z, dim=0).mul_(1.0 / (B - 1)).masked_fill_(flat, 0.0)
    grad = dz.sub_(s1).sub_(z * s2).mul_(rstd)
    if x_ok is not None:
        grad.mul_(x_ok)
    grad_x = grad.new_zeros((B, x.shape[1]))
    grad_x.index_add_(1, index, grad)  # (in a fixed order on the CPU, duplicates adding up)
    return grad_x.to(x.dtype) if grad_x.dtype != x.dtype else grad_x


def _reduce(diff: torch.Tensor, reduction: int, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss of diff [B, K] in its dtype: e = w·diff², reduced."""
    if reduction == REDUCTION_NONE:
        e = diff.square()
        return e if weight is None else e.mul_(weight)
    if weight is None and reduction != REDUCTION_COLUMN:
        flat = diff.view(-1)
        total = torch.linalg.vecdot(flat, flat)
        return total.mul_(1.0 / flat.shape[0]) if reduction == REDUCTION_MEAN else total
    return reduce_columns(torch.linalg.vecdot(diff, diff, dim=0), diff.shape[0], reduction, weight)


class _BatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor, plan) -> torch.Tensor:
        z, rstd, flat, x_ok, z_ok = _normalize(x, plan.columns.index, plan.eps, plan.nan_to_num)
        diff = into_target(torch.sub, z, torch.empty_like(z), plan.gap, target)
        out = _reduce(diff, plan.reduction, plan.weight)
        ctx.save_for_backward(x, target, z, diff, rstd, flat, x_ok, z_ok)
        ctx.plan = plan
        return out.to(x.dtype) if out.dtype != x.dtype else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if autocast_enabled() and torch.is_autocast_enabled("cpu"):  # inside an autocast region: sums in float32
            return without_autocast(_BatchLoss.backward, ctx, grad)
        x, target, z, diff, rstd, flat, x_ok, z_ok = ctx.saved_tensors
        plan, needs = ctx.plan, ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True
            composed = reference.batch_mse_composed(x, target, plan.columns.index, plan.eps, plan.nan_to_num,
                                                    plan.reduction, plan.gap, plan.weight)
            return (*reference.grads_through(composed, (x, target), needs, grad), None)
        B, K = diff.shape
        g, f = grad_factors(grad, plan.reduction, B, K, plan.weight, diff.dtype)
        dz = diff * f if g is None else diff * g.to(diff.dtype) * f  # 2·g·w·diff
        grad_target = None
        if needs[1]:
            grad_target = new_target_grad(B, K, plan.gap, target.dtype, target.device)
            into_target(torch.neg if grad_target.dtype == dz.dtype else _neg_cast, dz, grad_target, plan.gap)
        grad_x = _batch_norm_vjp(x, plan.columns.index, dz, (z, rstd, flat, x_ok, z_ok)) if needs[0] else None
        return grad_x, grad_target, None


class _BatchClean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan) -> torch.Tensor:
        z, rstd, flat, x_ok, z_ok = _normalize(x, plan.columns.index, plan.eps, plan.nan_to_num)
        ctx.save_for_backward(x, z, rstd, flat, x_ok, z_ok)
        ctx.plan = plan
        return z.to(x.dtype) if z.dtype != x.dtype else z.clone()  # (z itself is saved: the caller may write it)

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        if autocast_enabled() and torch.is_autocast_enabled("cpu"):
            return without_autocast(_BatchClean.backward, ctx, grad_z)
        x, z, rstd, flat, x_ok, z_ok = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True
            composed = reference.batch_clean_composed(x, plan.columns.index, plan.eps, plan.nan_to_num)
            return (*reference.grads_through(composed, (x,), (True,), grad_z), None)
        return _batch_norm_vjp(x, plan.columns.index, grad_z.to(z.dtype, copy=True), (z, rstd, flat, x_ok, z_ok)), None
