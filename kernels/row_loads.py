"""A candidate forward of the loss (norm "none" / "stats"), selectable but not the default: whole rows read
with 128-bit loads, the kept columns gathered inside the SM.

Today's forward (masked_mse.py) gathers x through the index from global memory: every load is a scalar
(the kept columns are not contiguous), a third of the tile's lanes idle at K = 171 (BLOCK_K = 256), and
most of the loop's instructions are 64-bit address arithmetic. Here a program reads a chunk of ROWS
whole rows of x, and of r, as one flat contiguous run: with contiguous rows the chunk of rows
[c·ROWS, (c + 1)·ROWS) starts at element c·ROWS·D, a multiple of ROWS, so with ROWS a multiple of
16 / element size every chunk starts 16-byte aligned although D and K are odd, and its loads are 128-bit
(LDG.E.128; tests/aot_report.md counts them). The kept columns are then picked from registers by
tl.gather (the compiler stages it through shared memory or warp shuffles), and r's loss columns likewise
(skipping a hybrid decoder's gap). The math is masked_mse.py's forward, every reduction and the weights
included; x's dropped columns are read too (16 of 187 in the motivating run: 9% more bytes of x, against
loads four times as wide).

Launched by the loss op (fusedvq/ops/loss.py) when TUNING.forward_loads == "rows" (FUSEDVQ_FORWARD_LOADS=rows)
and x and the target are contiguous and 16-byte aligned; otherwise today's kernel runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launchers import KernelLauncher, device_guard
from .plan import NORM_STATS, REDUCTION_COLUMN, REDUCTION_NONE, Mode, reduction_scale
from .tiles import (BLOCK_P, FLT_MAX, NORM_STATS_C, REDUCTION_COLUMN_C, REDUCTION_NONE_C, TUNING, cdiv, max_programs,
                    next_power_of_2, num_warps_for, scratch, scratch_guard, write_reduction)


@triton.jit
def _chunk(ptr, start, count, FLAT: tl.constexpr, VEC: tl.constexpr, COUNT_VEC: tl.constexpr):
    """ptr[start : start + count] as a flat [FLAT] block (0 past count). start is a multiple of VEC elements
    (16 bytes) and, for a full chunk, so is count (COUNT_VEC = VEC): said to the compiler, which cannot
    derive it through the loop counter, so that the loads are 128-bit."""
    offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, FLAT), FLAT), FLAT)
    base = ptr + tl.multiple_of(start, VEC)
    return tl.load(base + offs, mask=offs < tl.multiple_of(count, COUNT_VEC), other=0.0)


@triton.jit
def _chunk_terms(x_ptr, r_ptr, out_ptr, row0, n, D, RW, K, x_at, r_at, col_ok, cols, mu, inv_sigma, wk,
                 NORM: tl.constexpr, NAN_TO_NUM: tl.constexpr, REDUCTION: tl.constexpr, WEIGHTED: tl.constexpr,
                 ROWS: tl.constexpr, FLAT_X: tl.constexpr, FLAT_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 VEC: tl.constexpr, FULL: tl.constexpr):
    """The terms e [ROWS, BLOCK_K] of the n rows from row0 (0 elsewhere; reduction "none" stores them):
    x's and r's rows read whole, the kept and loss columns gathered in the SM. FULL: n == ROWS."""
    if FULL:
        xv = _chunk(x_ptr, row0 * D, ROWS * D, FLAT_X, VEC, VEC)
        rv = _chunk(r_ptr, row0 * RW, ROWS * RW, FLAT_R, VEC, VEC)
    else:
        xv = _chunk(x_ptr, row0 * D, n * D, FLAT_X, VEC, 1)
        rv = _chunk(r_ptr, row0 * RW, n * RW, FLAT_R, VEC, 1)
    xk = tl.reshape(tl.gather(xv, x_at, 0), [ROWS, BLOCK_K]).to(tl.float32)
    rk = tl.reshape(tl.gather(rv, r_at, 0), [ROWS, BLOCK_K]).to(tl.float32)
    if NAN_TO_NUM:
        xk = tl.where(tl.abs(xk) <= FLT_MAX, xk, 0.0)
    z = xk
    if NORM == NORM_STATS_C:
        z = (xk - mu[None, :]) * inv_sigma[None, :]
    rows = tl.arange(0, ROWS)
    ok = (rows < n)[:, None] & col_ok[None, :]
    diff = tl.where(ok, z - rk, 0.0)
    e = diff * diff
    if WEIGHTED and REDUCTION != REDUCTION_COLUMN_C:
        e = e * wk[None, :]
    if REDUCTION == REDUCTION_NONE_C:
        offs = (row0 + rows)[:, None] * K + cols[None, :]
        tl.store(out_ptr + offs, e.to(out_ptr.dtype.element_ty), mask=ok)
        e = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    return e


@triton.jit
def _rows_fwd_kernel(
    x_ptr,  # [B, D] contiguous rows (row stride D), 16-byte aligned
    r_ptr,  # [B, RW] contiguous rows (RW = K + gap_width), 16-byte aligned
    idx_ptr,  # [K] int64
    shift_ptr,  # [K] fp32 μ (NORM 1)
    scale_ptr,  # [K] fp32 1/σ (NORM 1)
    w_ptr,  # [K] fp32 weights (WEIGHTED)
    out_ptr,  # REDUCTION 0: [B, K]; 3: [K]; else []: dtype of x
    partial_ptr,  # [num_programs] fp32 (mean/sum)
    column_partial_ptr,  # [num_programs, K] fp32 (column)
    counter_ptr,  # [1] int32 ticket counter, zero between launches
    B,
    K,
    D,
    RW,
    gap_at,
    gap_width,
    out_scale,  # 1/(B·K) mean, 1/B column, 1 sum
    NORM: tl.constexpr,  # 0 none, 1 stats
    NAN_TO_NUM: tl.constexpr,
    REDUCTION: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ROWS: tl.constexpr,  # rows per chunk: a multiple of 16 / element size
    FLAT_X: tl.constexpr,  # next power of 2 of ROWS·D
    FLAT_R: tl.constexpr,  # next power of 2 of ROWS·RW
    BLOCK_K: tl.constexpr,  # next power of 2 of K
    BLOCK_P: tl.constexpr,
    VEC: tl.constexpr,  # elements in 16 bytes (4 fp32, 8 bf16 / fp16); ROWS is a multiple of it
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    d = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    col_ok = col_ok & (d >= 0) & (d < D)
    d = tl.where(col_ok, d, 0).to(tl.int32)
    rcols = cols + tl.where(cols >= gap_at, gap_width, 0)
    mu = tl.zeros([BLOCK_K], dtype=tl.float32)
    inv_sigma = tl.zeros([BLOCK_K], dtype=tl.float32)
    wk = tl.zeros([BLOCK_K], dtype=tl.float32)
    if NORM == NORM_STATS_C:
        mu = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        inv_sigma = tl.load(scale_ptr + cols, mask=col_ok, other=1.0)
    if WEIGHTED:
        wk = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    rows = tl.arange(0, ROWS)
    # Where each (row, kept column) sits in a chunk's flat x and r (gathered in the SM, not from memory).
    x_at = tl.reshape(rows[:, None] * D + d[None, :], [ROWS * BLOCK_K])
    r_at = tl.reshape(rows[:, None] * RW + tl.where(col_ok, rcols, 0)[None, :], [ROWS * BLOCK_K])
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    # Full chunks in the loop, the last partial one (B % ROWS rows) after it: two load sites, so that the
    # full chunks' masks stay multiples of the vector width and their loads 128-bit.
    full = B // ROWS
    for c in range(pid, full, num_programs):
        row0 = (tl.zeros([], dtype=tl.int64) + c) * ROWS  # (int64: row0·D passes 2³¹ for large B)
        acc += _chunk_terms(x_ptr, r_ptr, out_ptr, row0, ROWS, D, RW, K, x_at, r_at, col_ok, cols, mu, inv_sigma, wk,
                            NORM, NAN_TO_NUM, REDUCTION, WEIGHTED, ROWS, FLAT_X, FLAT_R, BLOCK_K, VEC, True)
    if (B % ROWS != 0) & (pid == full % num_programs):
        row0 = (tl.zeros([], dtype=tl.int64) + full) * ROWS
        n = B - full * ROWS
        acc += _chunk_terms(x_ptr, r_ptr, out_ptr, row0, n, D, RW, K, x_at, r_at, col_ok, cols, mu, inv_sigma, wk,
                            NORM, NAN_TO_NUM, REDUCTION, WEIGHTED, ROWS, FLAT_X, FLAT_R, BLOCK_K, VEC, False)
    if REDUCTION != REDUCTION_NONE_C:
        if REDUCTION == REDUCTION_COLUMN_C:
            tl.store(column_partial_ptr + pid.to(tl.int64) * K + cols, tl.sum(acc, axis=0), mask=col_ok)
        else:
            tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == num_programs - 1:
            write_reduction(partial_ptr, column_partial_ptr, w_ptr, out_ptr, num_programs, K, out_scale, REDUCTION,
                            WEIGHTED, BLOCK_K, BLOCK_P)
            tl.atomic_xchg(counter_ptr, 0)


_ROWS_FWD = KernelLauncher(_rows_fwd_kernel)


def rows_fit(x: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether the whole-row forward can read x and the target: contiguous rows, 16-byte aligned."""
    return (x.stride(1) == 1 and x.stride(0) == x.shape[1] and target.stride(1) == 1
            and target.stride(0) == target.shape[1] and x.data_ptr() % 16 == 0 and target.data_ptr() % 16 == 0)


def chunk_rows(element_size: int) -> int:
    """Rows per chunk: TUNING.rows_per_chunk rounded up to a multiple of 16 bytes' worth of elements."""
    vector = 16 // element_size
    return cdiv(max(TUNING.rows_per_chunk, 1), vector) * vector


def rows_forward(x, target, index, stats: tuple, mode: Mode, weight=None) -> torch.Tensor:
    """The loss ([], [K] or [B, K] in x.dtype) of norm "none" / "stats" by whole-row loads; rows_fit(x,
    target) must hold (launchers.masked_mse_forward checks it)."""
    B, D = x.shape
    K = index.shape[0]
    RW = target.shape[1]
    rows = chunk_rows(x.element_size())
    reduction = mode.reduction
    grid = (min(cdiv(B, rows), max_programs(x)),)
    shift, scale = stats if stats else (x, x)
    with device_guard(x), scratch_guard(x):
        column_partial = x
        if reduction == REDUCTION_NONE:
            out = torch.empty((B, K), dtype=x.dtype, device=x.device)
            partial = counter = out
        else:
            out = torch.empty((K,) if reduction == REDUCTION_COLUMN else (), dtype=x.dtype, device=x.device)
            counter, partial = scratch(x, grid[0])
            if reduction == REDUCTION_COLUMN:
                column_partial = torch.empty((grid[0], K), dtype=torch.float32, device=x.device)
        block_k = next_power_of_2(K)
        _ROWS_FWD[grid](
            x, target, index, shift, scale, x if weight is None else weight, out, partial, column_partial, counter,
            B, K, D, RW, mode.gap.at, mode.gap.width,
            reduction_scale(reduction, B, K),
            NORM=NORM_STATS if stats else 0, NAN_TO_NUM=int(mode.nan_to_num), REDUCTION=reduction,
            WEIGHTED=int(weight is not None), ROWS=rows, FLAT_X=next_power_of_2(rows * D),
            FLAT_R=next_power_of_2(rows * RW), BLOCK_K=block_k, BLOCK_P=BLOCK_P, VEC=16 // x.element_size(),
            num_warps=num_warps_for(rows, block_k),
        )  # fmt: skip
    return out
