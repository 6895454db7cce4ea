"""The CPU implementation of norm="batch", the loss and clean_features: reference.py's math with hand-written
gradients (batch norm's VJP), in the blocked passes of blocked.py.

Every pass walks the rows in blocks whose gather and normalization live in warm scratch (blocked.py says why:
fresh batch-sized buffers cost page faults, several times the arithmetic), so a step first-touches only
the buffers it returns: grad_x and grad_target, and z for clean_features. Nothing batch-sized is saved
for the backward, which recomputes z from x block by block (as the kernels do).
    moments   one pass: each block's (m, M2) around the shift c (the batch's first row), merged across
              blocks with Chan's formula (cpu/moments.py)
    forward   one pass: z, then the loss and its column sums A, or z itself (clean_features)
    backward  mean/sum: one pass (S = 2g·A); reduction "none" and clean_features: a pass for S, then one
              for the gradients
Blocks hold NaN/Inf only where the data does: a block whose sum is finite has no non-finite entry (NaN and
±Inf propagate into a sum), so on the CPU the finite masks are built only for blocks that need them; on
other devices (backend="reference" on CUDA) always, since asking would synchronize with the host.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..kernels.plan import REDUCTION_COLUMN, REDUCTION_NONE, Mode, COMPUTE_DTYPE
from .moments import merge_moments
from .blocked import _block_rows, _dots, _scatter_rows, _total, grad_factors, into_target, new_target_grad
from .blocked import reduce_columns

# The statistics of a batch, moments [5, K] = (c, m, 1/σ', 1/(N − 1), 1/N): the shift c (the batch's first
# row), the mean m around it, 1/σ' (σ' = 1 where σ < eps), 1/(N − 1) (0 where σ' = 1: no gradient through
# σ), 1/N. reference.py states the math; the kernels write the same rows.
MOMENT_SHIFT, MOMENT_MEAN, MOMENT_RSTD, MOMENT_INV_N1, MOMENT_INV_N = range(5)


def finalize_moments(count, shift: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """stats [5, K] = (c, m, 1/σ', 1/(N − 1), 1/N) from N rows' (c, m, M2); count is an int or a 0-d tensor."""
    if isinstance(count, int):  # this batch's own rows: the scalars on the host, fewer ops (small batches)
        sigma = torch.sqrt(m2 / max(count - 1, 1))
        flat = sigma < eps if count >= 2 else torch.ones_like(sigma, dtype=torch.bool)
        rstd = sigma.reciprocal().masked_fill_(flat, 1.0)
        # (a where() of two Python scalars would be float32 whatever sigma's dtype: 1e-8 off in float64)
        inv_n1 = torch.full_like(sigma, 1.0 / max(count - 1, 1)).masked_fill_(flat, 0.0)
        return torch.stack([shift, mean, rstd, inv_n1, torch.full_like(sigma, 1.0 / max(count, 1))])
    n = torch.as_tensor(count, dtype=mean.dtype, device=mean.device)
    sigma = torch.sqrt(m2 / (n - 1).clamp_min(1))
    flat = (sigma < eps) | (n < 2)  # σ' = 1 and no gradient through σ
    rstd = torch.where(flat, torch.ones_like(sigma), sigma.reciprocal())
    inv_n1 = torch.where(flat, torch.zeros_like(sigma), (n - 1).clamp_min(1).reciprocal().expand_as(sigma))
    inv_n = n.clamp_min(1).reciprocal().expand_as(sigma)
    return torch.stack([shift, mean, rstd, inv_n1, inv_n])


class _Blocks:
    """The row blocks of one pass over x [B, D]'s kept columns: block(rows) gives z or x̃ of those rows in
    warm scratch [n, K] (compute dtype), with the finite masks of the block when it has non-finite values."""

    def __init__(self, x: torch.Tensor, index: torch.Tensor, nan_to_num: bool):
        self.x, self.index, self.nan_to_num = x, index, nan_to_num
        self.B, self.K = x.shape[0], index.shape[0]
        self.cdt = COMPUTE_DTYPE[x.dtype]
        self.step = _block_rows(x, self.K)
        self.buf = torch.empty((min(self.step, self.B), self.K), dtype=self.cdt, device=x.device)

    def rows(self):
        for start in range(0, self.B, self.step):
            yield slice(start, min(start + self.step, self.B))

    def features(self, rows: slice):
        """(x̃ [n, K], x_ok [n, K] bool or None): x̃ = nan_to_num(x) of the kept columns when nan_to_num."""
        n = rows.stop - rows.start
        out = self.buf[:n]
        if self.x.dtype == self.cdt:
            torch.index_select(self.x[rows], 1, self.index, out=out)
        else:
            out.copy_(self.x[rows].index_select(1, self.index))
        x_ok = None
        if self.nan_to_num and not _known_finite(out):
            x_ok = torch.isfinite(out)
            out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return out, x_ok

    def normalized(self, rows: slice, moments: torch.Tensor, mr: torch.Tensor):
        """(z [n, K], z_ok or None, x_ok or None): z = nan_to_num((x̃ − c)·(1/σ') − m·(1/σ')), mr = m·(1/σ')."""
        z, x_ok = self.features(rows)
        z, z_ok = _finite_or_masked(z.sub_(moments[MOMENT_SHIFT]).mul_(moments[MOMENT_RSTD]).sub_(mr))
        return z, z_ok, x_ok


def _known_finite(t: torch.Tensor) -> bool:
    """Whether every entry is known finite, from one sum: NaN and ±Inf propagate into it, and a sum that
    overflows only sends the caller down the exact path with masks. Off the CPU (the reference path on CUDA
    tensors) the answer would cost a host synchronization, so it is "not known" and the masks are built."""
    return t.device.type == "cpu" and bool(torch.isfinite(t.sum()))


def batch_moments(blocks: _Blocks, eps: float, merge_and_finalize=None):
    """(moments [5, K] = (c, m, 1/σ', 1/(N − 1), 1/N) of the kept columns (over all ranks with merge_and_finalize),
    the one block's x̃ − c − m in the scratch buffer when the batch is one block, else None)."""
    parts, shift, centered = [], None, None
    for rows in blocks.rows():
        dev, _ = blocks.features(rows)
        if shift is None:
            shift = dev[0].clone()  # the batch's first row: a constant column gives m = M2 = 0 exactly
        mean = dev.sub_(shift).mean(0)
        centered = dev.sub_(mean)
        parts.append((rows.stop - rows.start, shift, mean, torch.linalg.vecdot(centered, centered, dim=0)))
    if not parts:  # no rows (a rank without data)
        zeros = blocks.buf.new_zeros(blocks.K)
        parts = [(0, zeros, zeros, zeros)]
    count, shift, mean, m2 = parts[0] if len(parts) == 1 else merge_moments(parts, blocks.cdt)
    if merge_and_finalize is not None:
        return merge_and_finalize(blocks.B, shift, mean, m2), None  # the merged m differs from this batch's
    return finalize_moments(count, shift, mean, m2, eps), (centered if len(parts) == 1 else None)


def _z_blocks(blocks: _Blocks, moments: torch.Tensor, centered):
    """(rows, z, z_ok) of each block: from the moments' own buffer when the batch was one block (z =
    (x̃ − c − m)·(1/σ'), no second gather), else normalized again."""
    if centered is not None and blocks.B > 0:
        z = centered.mul_(moments[MOMENT_RSTD])
        yield slice(0, blocks.B), *_finite_or_masked(z)
        return
    mr = moments[MOMENT_MEAN] * moments[MOMENT_RSTD]
    for rows in blocks.rows():
        z, z_ok, _ = blocks.normalized(rows, moments, mr)
        yield rows, z, z_ok


def _finite_or_masked(z: torch.Tensor):
    """(z, z_ok): z with its non-finite entries set to 0 and their mask, or (z, None) when all are finite."""
    if _known_finite(z):
        return z, None
    z_ok = torch.isfinite(z)
    return z.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), z_ok


def batch_mse_forward(
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K (+ c)]
    index: torch.Tensor,  # [K] int64
    eps: float,
    mode: Mode,  # nan_to_num, reduction, gap (the target's c skipped columns from `at` on)
    merge_and_finalize=None,  # (count, c, m, M2) -> moments [5, K] over all ranks; None: this batch only
    weight: Optional[torch.Tensor] = None,  # [K] compute dtype, or None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss in x.dtype, moments [5, K], column sums A [2, K] = (Σ diff·[z finite], Σ diff·z), or [0, K] for
    reduction "none", whose backward sums with g[b, k] itself), in the compute dtype."""
    reduction, gap = mode.reduction, mode.gap
    blocks = _Blocks(x, index, mode.nan_to_num)
    moments, centered = batch_moments(blocks, eps, merge_and_finalize)
    K = blocks.K
    none = reduction == REDUCTION_NONE
    loss = torch.empty((blocks.B, K), dtype=x.dtype, device=x.device) if none else None
    colsums = moments.new_zeros((0 if none else 2, K))
    by_column = reduction == REDUCTION_COLUMN or (weight is not None and not none)
    parts, columns, diff_buf = [], moments.new_zeros(K) if by_column else None, torch.empty_like(blocks.buf)
    for rows, z, z_ok in _z_blocks(blocks, moments, centered):
        diff = into_target(torch.sub, z, diff_buf[: z.shape[0]], gap, target[rows])
        if none:
            loss[rows] = diff.square_() if weight is None else diff.square_().mul_(weight)
            continue
        if by_column:
            columns += torch.linalg.vecdot(diff, diff, dim=0)
        else:
            parts += _dots(diff)
        colsums[1] += torch.linalg.vecdot(diff, z, dim=0)  # z = 0 where not finite: no mask needed
        colsums[0] += (diff if z_ok is None else diff.mul_(z_ok)).sum(0)
    if none:
        return loss, moments, colsums
    if by_column:
        return reduce_columns(columns, blocks.B, reduction, weight).to(x.dtype), moments, colsums
    if blocks.B == 0:
        return moments.new_zeros(()).to(x.dtype), moments, colsums
    return _total(parts, blocks.B * K, reduction, x).to(x.dtype), moments, colsums


def batch_mse_backward(
    grad_loss: torch.Tensor,  # [] or [B, K]
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K (+ c)]
    index: torch.Tensor,  # [K]
    saved: tuple,  # (moments [5, K], colsums [2, K] ([0, K] for reduction "none")) from the forward
    mode: Mode,  # the forward's; needs: (grad_x, grad_target) wanted, the other comes back None
    sum_over_ranks=None,  # [2, K] -> [2, K] summed over all ranks; None: this batch only
    weight: Optional[torch.Tensor] = None,  # [K] compute dtype, or None
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_x [B, D] in x.dtype, grad_target [B, K] (or [B, K + c]) in target.dtype), None where not wanted."""
    moments, colsums = saved
    reduction, gap, needs = mode.reduction, mode.gap, mode.needs
    blocks = _Blocks(x, index, mode.nan_to_num)
    B, K = blocks.B, blocks.K
    none = reduction == REDUCTION_NONE
    g, f = grad_factors(grad_loss, reduction, B, K, weight, blocks.cdt)
    mr = moments[MOMENT_MEAN] * moments[MOMENT_RSTD]
    dz_buf = torch.empty_like(blocks.buf)
    grad_target = new_target_grad(B, K, gap, target.dtype, x.device) if needs[1] else None

    def dz_of(rows, last_pass=True):
        """(dz, z, x_ok) of a block: dz = 2·g·diff·[z finite]; on the last pass also grad_target = −2·g·diff."""
        z, z_ok, x_ok = blocks.normalized(rows, moments, mr)
        dz = into_target(torch.sub, z, dz_buf[: z.shape[0]], gap, target[rows])
        dz = dz.mul_(g[rows]).mul_(f) if none else dz.mul_(f)
        if last_pass and grad_target is not None:  # before the mask: it applies to z's gradient only
            into_target(torch.neg if grad_target.dtype == dz.dtype else _neg_cast, dz, grad_target[rows], gap)
        return (dz if z_ok is None else dz.mul_(z_ok)), z, x_ok

    if none:  # (its one block, when reused, writes grad_target here)
        sums, first = _dz_sums(blocks, functools.partial(dz_of, last_pass=blocks.B <= blocks.step))
    else:
        sums, first = colsums * f, None
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums)
    if not needs[0]:
        if grad_target is not None and not (none and blocks.B <= blocks.step):  # not yet written by the sums
            for rows in blocks.rows():
                dz_of(rows)
        return None, grad_target
    return _grad_x_by_blocks(blocks, dz_of, moments, sums, first), grad_target


def _neg_cast(a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = −a, cast to out's dtype."""
    return out.copy_(a.neg())


def _dz_sums(blocks: _Blocks, dz_of):
    """(S1, S2) [2, K] = (Σ_b dz, Σ_b dz·z) over the blocks, and the one block's (dz, z, x_ok) when there
    is only one (the gradient pass then reuses it instead of computing it again)."""
    sums = blocks.buf.new_zeros((2, blocks.K))
    last = None
    for rows in blocks.rows():
        dz, z, x_ok = last = dz_of(rows)
        sums[0] += dz.sum(0)
        sums[1] += torch.linalg.vecdot(dz, z, dim=0)
    return sums, (last if blocks.B <= blocks.step else None)


def _grad_x_by_blocks(blocks: _Blocks, dz_of, moments: torch.Tensor, sums: torch.Tensor, first=None) -> torch.Tensor:
    """grad_x [B, D] in x.dtype: (1/σ')·(dz − S1/N − z·S2/(N − 1)) added into the columns index names, 0 where x
    was non-finite, block by block (first: the one block's (dz, z, x_ok), already computed)."""
    s1n = sums[0] * moments[MOMENT_INV_N]
    s2n1 = sums[1] * moments[MOMENT_INV_N1]
    rstd = moments[MOMENT_RSTD]
    grad_x = torch.empty((blocks.B, blocks.x.shape[1]), dtype=blocks.x.dtype, device=blocks.x.device)
    scatter_buf = None
    for rows in blocks.rows():
        dz, z, x_ok = first if first is not None else dz_of(rows)
        grad = dz.sub_(s1n).sub_(z.mul_(s2n1)).mul_(rstd)
        if x_ok is not None:
            grad.mul_(x_ok)
        scatter_buf = _scatter_rows(grad_x[rows], grad, blocks.index, scatter_buf)
    return grad_x


# ------------------------------------------------------------------------------------ clean_features


def batch_clean_forward(
    x: torch.Tensor,  # [B, D]
    index: torch.Tensor,  # [K] int64
    eps: float,
    mode: Mode,
    merge_and_finalize=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [B, K] in x.dtype, moments [5, K] in the compute dtype)."""
    blocks = _Blocks(x, index, mode.nan_to_num)
    moments, centered = batch_moments(blocks, eps, merge_and_finalize)
    z_out = torch.empty((blocks.B, blocks.K), dtype=x.dtype, device=x.device)
    for rows, z, _ in _z_blocks(blocks, moments, centered):
        z_out[rows] = z
    return z_out, moments


def batch_clean_backward(
    grad_z: torch.Tensor,  # [B, K]
    x: torch.Tensor,  # [B, D]
    index: torch.Tensor,  # [K]
    moments: torch.Tensor,  # [5, K] from the forward
    mode: Mode,
    sum_over_ranks=None,
) -> torch.Tensor:
    """grad_x [B, D] in x.dtype: batch norm's VJP with dz = grad_z·[z finite]."""
    blocks = _Blocks(x, index, mode.nan_to_num)
    mr = moments[MOMENT_MEAN] * moments[MOMENT_RSTD]
    dz_buf = torch.empty_like(blocks.buf)

    def dz_of(rows):
        z, z_ok, x_ok = blocks.normalized(rows, moments, mr)
        dz = dz_buf[: z.shape[0]]
        dz.copy_(grad_z[rows])
        return (dz if z_ok is None else dz.mul_(z_ok)), z, x_ok

    sums, first = _dz_sums(blocks, dz_of)
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums)
    return _grad_x_by_blocks(blocks, dz_of, moments, sums, first)
