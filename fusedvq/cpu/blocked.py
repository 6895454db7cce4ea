"""The blocked passes: the CPU implementation of norm "none" / "stats", the loss and clean_features of
reference.py with hand-written gradients, in row blocks (batch.py builds norm "batch" on the same blocks).

Gradients are analytic, so training on the CPU never materializes the [B, D] normalized features that
autograd through the plain composition would; small batches, where per-op overhead dominates, take the
composition itself (the routing point, ops/__init__.py, decides). stats: () or (μ, 1/σ) [K] in the compute
dtype; mode: kernels/plan.py's Mode (nan_to_num, reduction, gap, needs), as the kernels take them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.plan import COMPUTE_DTYPE, NO_GAP, REDUCTION_COLUMN, REDUCTION_MEAN, REDUCTION_NONE, Mode
from ..kernels.plan import Gap, reduction_scale


# How the CPU runs it. On the CPU a large batch costs memory traffic, and above all first touches: a fresh
# buffer of the batch's size is page-faulted in on its first write, one fault per 4 KiB page, which costs
# several times the arithmetic of this loss. So rows go in blocks of about _BLOCK_ELEMENTS elements, each
# block's gather and normalization run in scratch buffers small enough for the allocator to hand back
# warm, and a step first-touches two batch-sized buffers only: diff [B, K], written by the forward (the
# eager backward then writes grad_target over it, see masked_mse_backward's overwrite_diff) and grad_x [B, D].
# Blocks are few (6 at B = 65536, K = 171) because each op on a block is a parallel region that waits for
# its slowest thread, which a busy machine makes slow. Off the CPU the whole batch is one block.
_BLOCK_ELEMENTS = 1 << 21


def _block_rows(t: torch.Tensor, cols: int) -> int:
    """Rows per block of a pass over t's rows that touches `cols` values per row."""
    if t.device.type != "cpu":
        return max(t.shape[0], 1)
    return max(1, _BLOCK_ELEMENTS // max(cols, 1))


# A hybrid decoder's target [B, K + c] holds c columns the loss skips (a Gap(at, c)): the loss columns are
# target[:, :at] and target[:, at + c:], read and written as those two views, never gathered into a copy.


def into_target(op, a: torch.Tensor, out: torch.Tensor, gap: Gap, target=None, factor=None):
    """Over the target's loss columns, in their two runs around the gap: op(a, target's loss columns, out=out)
    (target given; out [n, K]), or op(a, factor, out=out's loss columns) (out target-shaped; factor a number,
    a 0-d tensor, or [K] per loss column, split with a's columns), or op(a, out=out's loss columns)."""
    gap_at, gap_width = gap
    second = target if target is not None else factor
    if not gap_width:
        return op(a, out=out) if second is None else op(a, second, out=out)
    if target is not None:
        runs = ((a[:, :gap_at], target[:, :gap_at], out[:, :gap_at]),
                (a[:, gap_at:], target[:, gap_at + gap_width :], out[:, gap_at:]))
    else:
        split = isinstance(factor, torch.Tensor) and factor.dim() > 0  # [K]: split with a's columns
        runs = ((a[:, :gap_at], factor[:gap_at] if split else factor, out[:, :gap_at]),
                (a[:, gap_at:], factor[gap_at:] if split else factor, out[:, gap_at + gap_width :]))
    for part, other, into in runs:
        op(part, out=into) if other is None else op(part, other, out=into)
    return out


def new_target_grad(B: int, K: int, gap: Gap, dtype, device) -> torch.Tensor:
    """grad_target [B, K + c], zero in the gap's columns (the loss does not depend on them)."""
    gap_at, gap_width = gap
    grad = torch.empty((B, K + gap_width), dtype=dtype, device=device)
    if gap_width:
        grad[:, gap_at : gap_at + gap_width].zero_()
    return grad


def _diff_rows(
    out: torch.Tensor,  # [n, K] compute dtype: receives diff = z − r
    x: torch.Tensor,  # [n, D]
    target: torch.Tensor,  # [n, K]
    index: torch.Tensor,
    shift: Optional[torch.Tensor],  # [K] μ, or None
    scale: Optional[torch.Tensor],
    finite: Optional[torch.Tensor],  # [n, K] bool: receives isfinite(x[:, index]) (nan_to_num), or None
    scratch: Optional[torch.Tensor] = None,  # [n, K] compute dtype for z, when out is fresh memory
    gap: Gap = NO_GAP,  # target [n, K + gap.width]: skip its gap's columns
) -> torch.Tensor:
    # z is built in scratch (warm) when out is fresh: the gather runs on one thread, and the first touch of
    # fresh pages costs half as much from the two threads of the final subtraction.
    z = out if scratch is None else scratch
    if z.dtype == x.dtype:
        torch.index_select(x, 1, index, out=z)
    else:
        z.copy_(x.index_select(1, index))  # widened to the compute dtype once
    if finite is not None:
        finite.copy_(torch.isfinite(z))
        z.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if scale is not None:
        # (x − μ)·(1/σ), in this order: x·(1/σ) − μ/σ would cancel ~1e-4 of z for features far from 0.
        z.sub_(shift).mul_(scale)
    return into_target(torch.sub, z, out, gap, target)


def masked_mse_forward(
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K (+ c)]
    index: torch.Tensor,  # [K] int64
    stats: tuple,  # () or (μ, 1/σ)
    mode: Mode,
    weight: Optional[torch.Tensor] = None,  # [K] compute dtype, or None
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns (loss, diff [B, K] in compute dtype, finite [B, K] bool or None), the last two for backward."""
    shift, scale = stats if stats else (None, None)
    nan_to_num, reduction, gap = mode.nan_to_num, mode.reduction, mode.gap
    B, K = x.shape[0], index.shape[0]
    diff = torch.empty((B, K), dtype=COMPUTE_DTYPE[x.dtype], device=x.device)
    finite = torch.empty((B, K), dtype=torch.bool, device=x.device) if nan_to_num else None
    step = _block_rows(x, K)
    scratch = torch.empty((min(step, B), K), dtype=diff.dtype, device=x.device)
    by_column = reduction == REDUCTION_COLUMN or (weight is not None and reduction != REDUCTION_NONE)
    parts, columns = [], diff.new_zeros(K) if by_column else None
    for start in range(0, B, step):
        rows = slice(start, start + step)
        block = _diff_rows(diff[rows], x[rows], target[rows], index, shift, scale,
                           None if finite is None else finite[rows], scratch[: min(step, B - start)], gap)
        if by_column:  # while the block is in cache
            columns += torch.linalg.vecdot(block, block, dim=0)
        elif reduction != REDUCTION_NONE:
            parts += _dots(block)
    if reduction == REDUCTION_NONE:
        loss = diff.square() if weight is None else diff.square().mul_(weight)
    elif by_column:
        loss = reduce_columns(columns, B, reduction, weight)
    else:
        loss = _total(parts, B * K, reduction, x)
    return loss.to(x.dtype), diff, finite


def reduce_columns(columns: torch.Tensor, B: int, reduction: int, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss from the column sums Σ_b diff² [K]: Σ_b e/B per column (column), or Σe/(B·K) | Σe with
    e = w·diff²."""
    scale = reduction_scale(reduction, B, columns.shape[0])
    if reduction == REDUCTION_COLUMN:
        columns = columns * scale
        return columns.mul_(weight) if weight is not None else columns
    total = torch.linalg.vecdot(columns, weight) if weight is not None else columns.sum()
    return total * scale if reduction == REDUCTION_MEAN else total


def grad_factors(grad_loss: torch.Tensor, reduction: int, B: int, K: int, weight: Optional[torch.Tensor], cdt):
    """(g [B, K] or None, f: a 0-d or [K] tensor, or a number) with ∂loss/∂z = 2·g·w·diff = g·f·diff: g is
    grad_out itself for reduction "none"; f carries the 2, the reduction's scale, grad_out's value (mean,
    sum: [], column: [K]) and the weights. A per-column f (never per row) keeps the batch-norm backward's
    sums S = f·A of the forward's column sums A."""
    if reduction == REDUCTION_NONE:
        return grad_loss, (2.0 * weight if weight is not None else 2.0)
    f = grad_loss.to(cdt) * (2.0 * reduction_scale(reduction, B, K))
    return None, (f * weight if weight is not None else f)


# A single fp32 dot keeps one running sum per SIMD lane, and its error grows with the terms per lane: over
# 512K terms of one value (x = 1000.1) it drifts by ~1e-5 relative. Dots of 16K terms stay near 2e-8, and
# linalg.vecdot takes a block's rows of 16K in one call (a block's few results then add up in a tree), so
# the loss stays within 1e-6 of float64 up to B·K = 1e8 and beyond.
_DOT_ELEMENTS = 1 << 14


def _dots(block: torch.Tensor) -> list[torch.Tensor]:
    """Σ block² as partial sums: one per _DOT_ELEMENTS terms, added in a tree, and one for the tail."""
    flat = block.reshape(-1)
    whole = flat.shape[0] - flat.shape[0] % _DOT_ELEMENTS
    parts = []
    if whole:
        rows = flat[:whole].view(-1, _DOT_ELEMENTS)
        parts.append(torch.linalg.vecdot(rows, rows).sum())
    if whole < flat.shape[0]:
        tail = flat[whole:]
        parts.append(torch.dot(tail, tail))
    return parts


def _total(parts: list[torch.Tensor], numel: int, reduction: int, like: torch.Tensor) -> torch.Tensor:
    if not parts:  # no rows
        parts = [like.new_zeros((), dtype=COMPUTE_DTYPE[like.dtype])]
    total = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
    return total / numel if reduction == REDUCTION_MEAN else total


def masked_mse_backward(
    grad_loss: torch.Tensor,  # [] (mean, sum), [K] (column) or [B, K] (none)
    x: torch.Tensor,  # [B, D] (its width and dtype)
    target: torch.Tensor,  # [B, K (+ c)] (its dtype)
    index: torch.Tensor,  # [K] int64
    stats: tuple,  # () or (μ, 1/σ)
    saved: tuple,  # (diff [B, K] compute dtype, finite [B, K] bool or None) from the forward
    mode: Mode,  # the forward's; needs: (grad_x, grad_target) wanted, the other comes back None
    overwrite_diff: bool = False,
    weight: Optional[torch.Tensor] = None,  # [K] compute dtype, or None
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_x [B, D] in x's dtype, grad_target [B, K (+ c)] in target's), block by block: dz = ∂loss/∂z =
    g·f·diff (grad_factors), grad_target = −dz, grad_x = dz·(1/σ) scattered to the kept columns (0 where x
    was non-finite). With overwrite_diff, for a caller that owns diff and needs it no more, grad_target is
    written over diff (when it has diff's dtype: each block is read before it is overwritten), so the
    backward first-touches one fresh buffer (grad_x), not two."""
    diff, finite = saved
    scale = stats[1] if stats else None
    B, K, needs, gap = x.shape[0], index.shape[0], mode.needs, mode.gap
    device = grad_loss.device
    grad_x = torch.empty((B, x.shape[1]), dtype=x.dtype, device=device) if needs[0] else None
    grad_target = diff if overwrite_diff and needs[1] and target.dtype == diff.dtype and not gap.width else None
    if grad_target is None and needs[1]:
        grad_target = new_target_grad(B, K, gap, target.dtype, device)
    g, f = grad_factors(grad_loss, mode.reduction, B, K, weight, COMPUTE_DTYPE[x.dtype])
    neg_f = -f
    f_scale = f * scale if scale is not None else f
    dz_buf = scatter_buf = None
    step = _block_rows(diff, K)
    for start in range(0, B, step):
        rows = slice(start, start + step)
        block = diff[rows]
        if dz_buf is None:  # the first block is the largest
            dz_buf = torch.empty_like(block)
        dz = dz_buf[: block.shape[0]]
        if g is not None:  # reduction "none": g·f·diff, then ·scale
            torch.mul(g[rows], block, out=dz).mul_(f)
            if grad_target is not None:
                into_target(torch.mul, dz, grad_target[rows], gap, factor=-1.0)
            if scale is not None:
                dz.mul_(scale)
        else:
            torch.mul(block, f_scale, out=dz)
            if grad_target is not None:
                into_target(torch.mul, block, grad_target[rows], gap, factor=neg_f)
        if grad_x is not None:
            if finite is not None:
                dz.mul_(finite[rows])
            scatter_buf = _scatter_rows(grad_x[rows], dz, index, scatter_buf)
    return grad_x, grad_target


def _add_columns(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """out[:, index[k]] += src[:, k] for every k, duplicates adding up, in the same order on every run: on
    CUDA index_add_ adds duplicates with atomics in no fixed order, while index_put_ with accumulate sorts
    the indices first (it is also what the gradient of x[:, index] runs)."""
    if out.is_cuda:
        torch.ops.aten.index_put_(out, [None, index], src, True)
    else:
        out.index_add_(1, index, src)


def _scatter_rows(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor, buf: Optional[torch.Tensor]):
    """out [n, D] ← src [n, K] added into the columns index names, zeros elsewhere. Accumulates in src's
    dtype: through buf (made here when None) when out's dtype is narrower. Returns buf for the next block."""
    if out.dtype == src.dtype:
        _add_columns(out.zero_(), index, src)
        return buf
    if buf is None:
        buf = src.new_empty(out.shape)
    acc = buf[: out.shape[0]]
    _add_columns(acc.zero_(), index, src)
    out.copy_(acc)
    return buf


def scatter_columns(
    grad_xk: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64
    num_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """grad_x [B, D] with grad_x[:, d] = Σ_{k : index[k] = d} grad_xk[:, k]; zero in the dropped columns."""
    grad_x = torch.empty((grad_xk.shape[0], num_features), dtype=dtype, device=grad_xk.device)
    step = _block_rows(grad_x, num_features)
    buf = None
    for start in range(0, grad_x.shape[0], step):
        rows = slice(start, start + step)
        buf = _scatter_rows(grad_x[rows], grad_xk[rows], index, buf)
    return grad_x


# ------------------------------------------------------------------------------------ clean_features


def clean_forward(x, index, stats: tuple, mode: Mode) -> torch.Tensor:
    """z [B, K] in x.dtype: the cleaned features of norm "none" / "stats" (reference.normalized_kept)."""
    shift, scale = stats if stats else (None, None)
    nan_to_num = mode.nan_to_num
    z = x.index_select(1, index)
    z = z.to(COMPUTE_DTYPE[x.dtype]) if z.dtype != COMPUTE_DTYPE[x.dtype] else z
    if nan_to_num:
        z.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if scale is not None:
        z.sub_(shift).mul_(scale)  # (x − μ)·(1/σ), in this order (see _diff_rows)
    return z.to(x.dtype) if z.dtype != x.dtype else z


def clean_backward(grad_z, x, index, stats: tuple, mode: Mode) -> torch.Tensor:
    """grad_x [B, D] in x.dtype: dz·(1/σ) added into the columns index names, 0 where x was non-finite."""
    scale, nan_to_num = stats[1] if stats else None, mode.nan_to_num
    cdt = COMPUTE_DTYPE[x.dtype]
    dz = grad_z.to(cdt) if scale is None else grad_z.to(cdt) * scale
    if nan_to_num:
        dz = dz * x.index_select(1, index).isfinite()
    return scatter_columns(dz, index, x.shape[1], x.dtype)
