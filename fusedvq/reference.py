"""The math of fusedvq in plain torch ops: the readable statement every backend implements, differentiable
by autograd to any order (so it also serves double backward and torch.func), and the float64-exact twin of
the tests' oracle. The fast CPU implementation with hand-written gradients is cpu/; the GPU one kernels/.

    x [B, D] features, r [B, K] target, index [K] (values in [0, D)), shift [K] = μ, scale [K] = 1/σ
    (a hybrid decoder's target is [B, K + gap_width]: its columns from gap_at on are skipped, r = the rest)
    x̃ = nan_to_num(x) if nan_to_num else x                         (NaN, ±Inf → 0)
    z[b, k] = (x̃[b, index[k]] − shift[k]) · scale[k]                 (norm="none": z = x̃[:, index])
    diff = z − r;  e = w[k]·diff² (w = 1 unweighted);  loss = Σe/(B·K) | Σe | e | Σ_b e/B
                                                                    (reduction mean | sum | none | column [K])
    ∂loss/∂r[b, k]        = −2·g[b, k]·w[k]·diff[b, k]      g = grad_out/(B·K) | grad_out | grad_out[b, k] | grad_out[k]/B
    ∂loss/∂x[b, d]        = Σ_{k : index[k] = d} 2·g[b, k]·w[k]·diff[b, k]·scale[k]   (0 where x was non-finite)

The weighted mean divides by B·K, not by Σw, as PyTorch's weighted losses without a normalizing option do;
the column reduction's mean over k is the mean loss (weighted or not).

A hybrid's objective (embeddings e [B, c] given, target [B, K + c]): one MSE over all K + c decoder columns
against combined = [z[:, :at], e, z[:, at:]] (the embeddings compared as given), e = w[j]·(combined − r)²
with w [K + c], the mean dividing by B·(K + c): exactly F.mse_loss(r, combined) (combined below states it).

clean_features returns z itself; with dz = ∂L/∂z given, ∂L/∂x[b, d] = Σ_{k : index[k] = d} dz[b, k]·scale[k]
(0 where x was non-finite): the loss's VJP with 2·g·diff replaced by dz.

norm="batch" (below) replaces μ, σ by the batch's own, with batch norm's gradient. Everything is computed
in float32 (float64 for float64 inputs) and cast once to the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .kernels.plan import COMPUTE_DTYPE, NO_GAP, REDUCTION_COLUMN, REDUCTION_MEAN, REDUCTION_NONE, Gap

_REDUCTIONS = ("none", "mean", "sum")  # by code (kernels/plan.py; REDUCTION_COLUMN = 3 is reduced here)


def normalized_kept(
    x: torch.Tensor,  # [B, D]
    index: torch.Tensor,  # [K] int64
    shift: Optional[torch.Tensor],  # [K] compute dtype, or None
    scale: Optional[torch.Tensor],  # [K] compute dtype, or None
    nan_to_num: bool,
) -> torch.Tensor:
    """z [B, K] in the compute dtype: the cleaned features of norm "none"/"stats", differentiable. Widening x
    before the gather makes duplicate columns' gradients add in the compute dtype."""
    cdt = COMPUTE_DTYPE[x.dtype]
    wide = x.to(cdt) if x.dtype != cdt else x  # (the no-op casts are skipped: at B = 4 each costs a share)
    # On CUDA, x[:, index]: its gradient adds duplicate columns in a fixed order (see cpu._add_columns).
    xk = wide[:, index] if x.is_cuda else wide.index_select(1, index)
    if nan_to_num:
        xk = torch.nan_to_num(xk, nan=0.0, posinf=0.0, neginf=0.0)  # its gradient is 0 where x was not finite
    return (xk - shift) * scale if scale is not None else xk


def clean_composed(x, index, shift, scale, nan_to_num: bool) -> torch.Tensor:
    """clean_features of norm "none"/"stats": z [B, K] in x's dtype, gradients by autograd."""
    z = normalized_kept(x, index, shift, scale, nan_to_num)
    return z.to(x.dtype) if z.dtype != x.dtype else z


def loss_columns(K: int, gap_at: int, gap_width: int, device) -> torch.Tensor:
    """[K] int64: the target column of each loss column, k + gap_width·[k >= gap_at]."""
    k = torch.arange(K, device=device)
    return torch.where(k < gap_at, k, k + gap_width)


def target_columns(target: torch.Tensor, gap_at: int, gap_width: int) -> torch.Tensor:
    """The target's K loss columns: all of them, or (gap_width > 0) all but the gap_width columns from gap_at
    on (a hybrid decoder's embedding columns, which the loss skips)."""
    if gap_width == 0:
        return target
    return target.index_select(1, loss_columns(target.shape[1] - gap_width, gap_at, gap_width, target.device))


def _mse(z: torch.Tensor, target: torch.Tensor, reduction: int, dtype: torch.dtype, weight=None) -> torch.Tensor:
    """F.mse_loss(z, target, reduction=("none", "mean", "sum")[reduction]) in z's dtype, cast to `dtype`; the
    column reduction (3) and a weight [K] through reduction "none"."""
    target = target.to(z.dtype) if target.dtype != z.dtype else target
    if weight is None and reduction != REDUCTION_COLUMN:
        loss = F.mse_loss(z, target, reduction=_REDUCTIONS[reduction])
    else:
        e = F.mse_loss(z, target, reduction="none")
        if reduction == REDUCTION_NONE:
            loss = e * weight
        else:  # the weights on the K column sums, not on the [B, K] elements: one batch-sized op fewer
            columns = e.sum(0)
            if reduction == REDUCTION_COLUMN:
                loss = columns / e.shape[0] if weight is None else columns * (weight / e.shape[0])
            else:
                loss = torch.dot(columns, weight)
                loss = loss / e.numel() if reduction == REDUCTION_MEAN else loss
    return loss.to(dtype) if loss.dtype != dtype else loss


def masked_mse_composed(
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64
    shift: Optional[torch.Tensor],  # [K] compute dtype, or None
    scale: Optional[torch.Tensor],  # [K] compute dtype, or None
    nan_to_num: bool,
    reduction: int,
    gap: Gap = NO_GAP,  # target [B, K + gap.width]: its gap's columns skipped (or compared with embeddings)
    weight: Optional[torch.Tensor] = None,  # [K] compute dtype ([K + gap.width] with embeddings), or None
    embeddings: Optional[torch.Tensor] = None,  # [B, gap.width]: a hybrid's objective over all the columns
) -> torch.Tensor:
    """The loss as differentiable torch ops on the K kept columns, gradients by autograd: for small batches,
    where per-op overhead is much of the cost (autograd's C++ backward has less of it than a Python one)."""
    z = normalized_kept(x, index, shift, scale, nan_to_num)
    return _hybrid_or_gapped_mse(z, target, gap, reduction, x.dtype, weight, embeddings)


def combined(z: torch.Tensor, embeddings: torch.Tensor, at: int) -> torch.Tensor:
    """A hybrid's compared input [B, K + c]: z's columns with the embeddings inserted at column `at` (what
    FeatureCleaner.combine builds for the encoder; the composition's statement of the objective)."""
    return torch.cat([z[:, :at], embeddings.to(z.dtype), z[:, at:]], dim=1)


def _hybrid_or_gapped_mse(z, target, gap, reduction: int, dtype, weight, embeddings) -> torch.Tensor:
    """_mse of z against the target's K loss columns, or (embeddings given) of combined(z, embeddings)
    against the whole target."""
    if embeddings is None:
        return _mse(z, target_columns(target, *gap), reduction, dtype, weight)
    return _mse(combined(z, embeddings, gap.at), target, reduction, dtype, weight)


def grads_through(outputs: torch.Tensor, inputs: tuple, needs: tuple, grad: torch.Tensor) -> list:
    """The gradients of `inputs` (None where needs says not) through the composition's graph of `outputs`,
    themselves differentiable: what a hand-written backward returns under create_graph=True."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(outputs, wanted, grad, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needs]


# ------------------------------------------------------------------------------------ norm="batch"
#
# Batch statistics of the kept columns (over all ranks when synchronized), N rows in all:
#     μ[k] = mean_b x̃[b, index[k]],  σ[k] = sqrt(M2[k] / (N − 1)),  σ'[k] = 1 if σ[k] < eps else σ[k]
#     z = nan_to_num((x̃[:, index] − μ) / σ'),  diff = z − r,  e = diff²
# The moments are taken around a shift c[k] from the data (the column's first row): μ = c + m with
# m = mean_b (x̃ − c), M2 = Σ_b (x̃ − c − m)², and z = ((x̃ − c) − m)/σ'. In float32 this is exact where it
# matters: a column constant within the batch has x̃ − c = 0, so m = M2 = 0 (σ' = 1, z = 0), and an offset
# |μ| ≫ σ is subtracted exactly (x̃ − c loses nothing when x̃ and c are close), where (x̃ − fl(μ)) would carry
# fl(μ)'s rounding — ulp(1e4) = 1e-3, a tenth of σ = 0.01 — into every z.
# Held as stats [5, K] = (c, m, 1/σ', w, 1/N) with w = 1/(N − 1), or 0 where σ' = 1 (no gradient through σ);
# N < 2 leaves σ undefined and is treated as σ' = 1. The backward is batch norm's (mask = finite z):
#     dz = 2·g·diff·mask,  S1 = Σ_b dz,  S2 = Σ_b dz·z                (sums over all N rows)
#     ∂L/∂x̃[b, index[k]] += (1/σ')·(dz − S1/N − z·S2·w),   ∂L/∂r = −2·g·diff
# (exact for the exact μ, σ; it needs Σ_b z = 0 only to the accuracy z has, which the shift provides).
# clean_features (z itself) has the same VJP with dz = ∂L/∂z·mask given.
# For reduction mean/sum g is one number, so S1 = 2g·A1 and S2 = 2g·A2 with column sums A = (Σ diff·mask,
# Σ diff·mask·z) that the forward already computes: the backward then needs no reduction of its own.

def batch_normalized_kept(x: torch.Tensor, index: torch.Tensor, eps: float, nan_to_num: bool) -> torch.Tensor:
    """z [B, K] in the compute dtype with this batch's own statistics, differentiable (through μ and σ): the
    same shifted moments as the implementations. The shift c is a constant (z does not depend on it), hence
    detached."""
    cdt = COMPUTE_DTYPE[x.dtype]
    xk = (x.to(cdt) if x.dtype != cdt else x).index_select(1, index)
    if nan_to_num:
        xk = torch.nan_to_num(xk, nan=0.0, posinf=0.0, neginf=0.0)
    dev = xk - xk.detach()[0]
    var, mean = torch.var_mean(dev, 0)  # correction 1
    if xk.shape[0] < 2:
        flat = torch.ones_like(var, dtype=torch.bool)
    else:
        flat = var.detach().sqrt() < eps  # σ' = 1, no gradient through σ
    # masked_fill before sqrt: σ' = 1 where flat, and its backward gives var a zero gradient there (a where()
    # after sqrt would meet sqrt's infinite derivative at var = 0: 0·inf = NaN). sqrt and a division, not
    # rsqrt: rsqrt's derivative var^-1.5 underflows float32 for σ above about 1e15.
    return torch.nan_to_num((dev - mean) / var.masked_fill(flat, 1.0).sqrt(), nan=0.0, posinf=0.0, neginf=0.0)


def batch_clean_composed(x: torch.Tensor, index: torch.Tensor, eps: float, nan_to_num: bool) -> torch.Tensor:
    """clean_features of norm="batch": z [B, K] in x's dtype, gradients by autograd (to any order)."""
    z = batch_normalized_kept(x, index, eps, nan_to_num)
    return z.to(x.dtype) if z.dtype != x.dtype else z


def batch_mse_composed(
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64
    eps: float,
    nan_to_num: bool,
    reduction: int,
    gap: Gap = NO_GAP,  # as in masked_mse_composed
    weight: Optional[torch.Tensor] = None,  # [K] compute dtype ([K + c] with embeddings), or None
    embeddings: Optional[torch.Tensor] = None,  # [B, c], as in masked_mse_composed (not in the statistics)
) -> torch.Tensor:
    """The batch-statistics loss as differentiable torch ops, gradients by autograd (so to any order, and
    under torch.func)."""
    z = batch_normalized_kept(x, index, eps, nan_to_num)
    return _hybrid_or_gapped_mse(z, target, gap, reduction, x.dtype, weight, embeddings)


# ------------------------------------------------------------------ P partial reconstructions, one target
#
# A categorical VQ-VAE's P partial decoders each reconstruct the whole input: partials r [P, B, K + c]
# against one cleaned target z [B, K] (normalized and gathered once, by clean_features; a hybrid's c gap
# columns from `at` on skipped, as target_columns does for one reconstruction):
#     E[p, k] = Σ_b (r[p, b, k] − z[b, k])² / B        reduction "column": [P, K], each partial's column errors
#     loss = Σ_{p, b, k} (r − z)² / (P·B·K)              reduction "mean": the mean over p of each partial's MSE
#                                                       (= E.mean(); the informativeness loss)
#     ∂loss/∂r[p, b, k] = 2·g[p, k]·(r − z),   ∂loss/∂z[b, k] = −Σ_p 2·g[p, k]·(r − z)
#                                                       g = grad_out/(P·B·K) | grad_out[p, k]/B
# A hybrid's objective (embeddings e [B, c] given): the target is combined(z, e, at) [B, K + c], compared with
# all K + c columns of each partial (E [P, K + c] in decoder order, the mean over P·B·(K + c)); ∂loss/∂e is
# −Σ_p 2·g·(r − combined) on the gap's columns, as ∂loss/∂z is on the others.

def partials_composed(z: torch.Tensor, partials: torch.Tensor, reduction: int, gap: Gap = NO_GAP,
                      embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The partials' loss of z [B, K] (with embeddings [B, c]: combined(z, embeddings, gap.at) [B, K + c])
    against partials [P, B, K + c] as differentiable torch ops, in z's dtype (computed in the compute dtype)."""
    cdt = COMPUTE_DTYPE[z.dtype]
    K = z.shape[1]
    if embeddings is not None:
        r, target = partials, combined(z, embeddings, gap.at)
    else:
        r = partials if gap.width == 0 else partials.index_select(2, loss_columns(K, *gap, partials.device))
        target = z
    diff = r.to(cdt) - target.to(cdt)  # [P, B, W]: the target broadcast over the partials
    if reduction == REDUCTION_COLUMN:
        loss = diff.square().sum(1) / z.shape[0]
    else:
        loss = diff.square().mean()
    return loss.to(z.dtype)
