"""norm="batch": column statistics of the kept columns, and the launch plan around masked_mse's kernels.

Math (reference.py, section norm="batch", states the same in torch ops), N rows, x̃ = x[:, idx[k]]:
    forward   c = x̃[0] (the shift), m = mean_b (x̃ − c), M2 = Σ_b (x̃ − c − m)², σ = sqrt(M2/(N − 1)),
              σ' = 1 where σ < eps (and no gradient through σ there) else σ,
              z = nan_to_num(((x̃ − c) − m)/σ'),  diff = z − r,  e = diff²,  loss as masked_mse's
    VJP       dz = 2·g·diff·[z finite],  S1 = Σ_b dz,  S2 = Σ_b dz·z
              ∂L/∂x̃ = (1/σ')·(dz − S1/N − z·S2/(N − 1)) (no last term where σ' = 1),  ∂L/∂r = −2·g·diff
              (mean/sum: S = 2g·A with the column sums A = (Σ diff·[z finite], Σ diff·[z finite]·z) that
              the forward writes, so the backward needs no reduction of its own)
clean_features (CLEAN) takes dz = ∂L/∂z·[z finite] as given and has no r: its forward is launches 1
and 2 writing z, its backward _dz_sums_kernel then the backward kernel, as reduction "none".
Launches, for any B:
    forward   1. _column_moments_kernel: per-program Chan-merged (m, M2) of each kept column around the shift
                 c (its first row); the last program merges them in program order and writes moments [5, K]
                 = (c, m, 1/σ', 1/(N − 1) (0 where σ' = 1), 1/N), or with cross-rank sync the local (c, m,
                 M2) for the caller to merge across ranks
              2. masked_mse's forward kernel with NORM=2: z, the loss and the column sums A [2, K]
    backward  mean/sum: masked_mse's backward kernel alone (S = g·A)
              none:     _dz_sums_kernel (S1 = Σ dz, S2 = Σ dz·z), then the backward kernel
Statistics are numerically stable: each tile's mean and M2 come from two passes over registers, and
tiles and programs merge with Chan's formula — never Σx² − (Σx)²/n.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launchers import KernelLauncher, device_guard, launch_backward, launch_forward
from .plan import NORM_BATCH, REDUCTION_COLUMN, REDUCTION_NONE, Mode, reduction_scale
from .tiles import (FLT_MAX, NORM_BATCH_C, chan_merge, column_affine, kept_columns, load_features, normalize,
                    num_warps_for, scratch, scratch_guard, store_partial_pair, sum_partial_pairs, walk_grid)



@triton.jit
def _column_moments_kernel(
    x_ptr,  # [B, D] features, any strides
    idx_ptr,  # [K] int64 kept columns
    partial_ptr,  # [num_programs, 2, K] fp32 workspace: each program's (m, M2) around the shift
    count_ptr,  # [num_programs] fp32 workspace: each program's row count
    moments_ptr,  # FINALIZE: [5, K] fp32 (c, m, 1/σ', 1/(N − 1), 1/N); else [3, K] fp32 (c, m, M2) of this batch
    counter_ptr,  # [1] int32 ticket counter, zero between launches
    B,
    K,
    D,
    stride_xb,
    stride_xd,
    eps,
    NAN_TO_NUM: tl.constexpr,
    FINALIZE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    row_blocks = tl.cdiv(B, BLOCK_B)
    n = 0.0
    for k0 in range(0, K, BLOCK_K):
        cols, d, col_ok = kept_columns(idx_ptr, k0, K, D, BLOCK_K)
        # The shift c: the column's first row (reference.py: a constant column gives m = M2 = 0 exactly).
        c = tl.load(x_ptr + d * stride_xd, mask=col_ok, other=0.0).to(tl.float32)
        if NAN_TO_NUM:
            c = tl.where(tl.abs(c) <= FLT_MAX, c, 0.0)
        n = 0.0
        mean = tl.zeros([BLOCK_K], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
        for rb in range(pid, row_blocks, num_programs):
            rows = tl.arange(0, BLOCK_B).to(tl.int64) + rb * BLOCK_B
            row_ok = rows < B
            ok = row_ok[:, None] & col_ok[None, :]
            xv = load_features(x_ptr, rows, d, ok, stride_xb, stride_xd, NAN_TO_NUM)
            dv = tl.where(ok, xv - c[None, :], 0.0)
            n_tile = tl.sum(row_ok.to(tl.float32), axis=0)
            tile_mean = tl.sum(dv, axis=0) / n_tile
            dev = tl.where(ok, dv - tile_mean[None, :], 0.0)
            n, mean, m2 = chan_merge(n, mean, m2, n_tile, tile_mean, tl.sum(dev * dev, axis=0))
        base = partial_ptr + pid.to(tl.int64) * 2 * K + cols
        tl.store(base, mean, mask=col_ok)
        tl.store(base + K, m2, mask=col_ok)
        if pid == 0:
            tl.store(moments_ptr + cols, c, mask=col_ok)
    tl.store(count_ptr + pid, n)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == num_programs - 1:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            n = 0.0
            mean = tl.zeros([BLOCK_K], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
            for p in range(0, num_programs):  # program order: deterministic
                base = partial_ptr + p * 2 * K + cols
                n_p = tl.load(count_ptr + p, cache_modifier=".cg")
                mean_p = tl.load(base, mask=col_ok, other=0.0, cache_modifier=".cg")
                m2_p = tl.load(base + K, mask=col_ok, other=0.0, cache_modifier=".cg")
                n, mean, m2 = chan_merge(n, mean, m2, n_p, mean_p, m2_p)
            tl.store(moments_ptr + K + cols, mean, mask=col_ok)
            if FINALIZE:  # fusedvq/cpu/batch.py finalize_moments, per column
                n_k = tl.zeros([BLOCK_K], dtype=tl.float32) + n
                sigma = tl.sqrt(m2 / tl.maximum(n_k - 1.0, 1.0))
                flat = (sigma < eps) | (n_k < 2.0)
                rstd = tl.where(flat, 1.0, 1.0 / sigma)
                inv_n1 = tl.where(flat, 0.0, 1.0 / tl.maximum(n_k - 1.0, 1.0))
                tl.store(moments_ptr + 2 * K + cols, rstd, mask=col_ok)
                tl.store(moments_ptr + 3 * K + cols, inv_n1, mask=col_ok)
                tl.store(moments_ptr + 4 * K + cols, 1.0 / tl.maximum(n_k, 1.0), mask=col_ok)
            else:
                tl.store(moments_ptr + 2 * K + cols, m2, mask=col_ok)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _dz_sums_kernel(
    grad_ptr,  # [B, W] ∂L/∂loss (reduction "none"), any strides; W = K + gap_width with EMBED, else K
    x_ptr,  # [B, D] features, any strides
    r_ptr,  # [B, K] target, any strides (not read with CLEAN)
    idx_ptr,  # [K] int64
    shift_ptr,  # [K] fp32 c, the moments' shift
    center_ptr,  # [K] fp32 m, the batch mean around c
    scale_ptr,  # [K] fp32 1/σ'
    w_ptr,  # [W] fp32: the loss's weights (WEIGHTED)
    partial_ptr,  # [num_programs, 2, K] fp32 workspace
    sums_ptr,  # [2, K] fp32 out: S1 = Σ_b dz, S2 = Σ_b dz·z with dz = 2·g·w·diff·m (CLEAN: g·m)
    counter_ptr,  # [1] int32 ticket counter
    B,
    K,
    D,
    stride_gb,
    stride_gk,
    stride_xb,
    stride_xd,
    stride_rb,
    stride_rk,
    gap_at,  # as in the loss kernels: kept column k is r's column k + (gap_width if k >= gap_at else 0)
    gap_width,
    NAN_TO_NUM: tl.constexpr,
    CLEAN: tl.constexpr,  # 0/1: clean_features, g = ∂L/∂z (dz = g·m)
    WEIGHTED: tl.constexpr,  # 0/1: the loss's e = w[k]·diff²
    EMBED: tl.constexpr,  # 0/1: a hybrid's objective: grad and w in r's column order (the gap's columns too)
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    row_blocks = tl.cdiv(B, BLOCK_B)
    for k0 in range(0, K, BLOCK_K):
        cols, d, col_ok = kept_columns(idx_ptr, k0, K, D, BLOCK_K)
        mu, center, inv_sigma = column_affine(shift_ptr, center_ptr, scale_ptr, cols, col_ok, NORM_BATCH_C)
        rcols = (cols + tl.where(cols >= gap_at, gap_width, 0)).to(tl.int64)  # r's columns
        gcols = rcols if EMBED else cols.to(tl.int64)  # grad's and the weights'
        if WEIGHTED:
            wk = tl.load(w_ptr + gcols, mask=col_ok, other=0.0)
        s1 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        for rb in range(pid, row_blocks, num_programs):
            rows = tl.arange(0, BLOCK_B).to(tl.int64) + rb * BLOCK_B
            ok = (rows < B)[:, None] & col_ok[None, :]
            xv = load_features(x_ptr, rows, d, ok, stride_xb, stride_xd, NAN_TO_NUM)
            z, z_ok = normalize(xv, mu, center, inv_sigma, NORM_BATCH_C)
            gv = tl.load(grad_ptr + rows[:, None] * stride_gb + gcols[None, :] * stride_gk, mask=ok, other=0.0)
            if CLEAN:
                dz = tl.where(ok & z_ok, gv.to(tl.float32), 0.0)
            else:
                rv = tl.load(r_ptr + rows[:, None] * stride_rb + rcols[None, :] * stride_rk, mask=ok, other=0.0)
                dz = tl.where(ok & z_ok, 2.0 * gv.to(tl.float32) * (z - rv.to(tl.float32)), 0.0)
                if WEIGHTED:
                    dz = dz * wk[None, :]
            s1 += dz
            s2 += dz * z
        store_partial_pair(partial_ptr, pid, cols, col_ok, K, s1, s2)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == num_programs - 1:
        sum_partial_pairs(partial_ptr, sums_ptr, num_programs, K, BLOCK_K)
        tl.atomic_xchg(counter_ptr, 0)


# ---------------------------------------------------------------------------------------------- launchers

_MOMENTS = KernelLauncher(_column_moments_kernel)
_DZ_SUMS = KernelLauncher(_dz_sums_kernel)


def column_moments(x: torch.Tensor, index: torch.Tensor, eps: float, nan_to_num: bool, finalize: bool):
    """FINALIZE: moments [5, K] fp32 (c, m, 1/σ', 1/(N − 1), 1/N); else [3, K] fp32 (c, m, M2) of these B rows."""
    B, D = x.shape
    K = index.shape[0]
    rows = torch.empty((5 if finalize else 3, K), dtype=torch.float32, device=x.device)
    if B == 0:  # a rank without rows: nothing to launch
        return rows.zero_()
    block_b, block_k, grid = walk_grid(x, B, K)
    with device_guard(x), scratch_guard(x):
        partial = torch.empty((grid[0], 2, K), dtype=torch.float32, device=x.device)
        counts = torch.empty(grid[0], dtype=torch.float32, device=x.device)
        _MOMENTS[grid](
            x, index, partial, counts, rows, scratch(x, grid[0])[0],
            B, K, D, x.stride(0), x.stride(1), eps,
            NAN_TO_NUM=int(nan_to_num), FINALIZE=int(finalize), BLOCK_B=block_b, BLOCK_K=block_k,
            num_warps=num_warps_for(block_b, block_k),
        )  # fmt: skip
    return rows


def batch_moments(x, index, eps: float, nan_to_num: bool, merge_and_finalize=None) -> torch.Tensor:
    """moments [5, K] fp32 of this batch (or, with merge_and_finalize, over all ranks)."""
    if merge_and_finalize is None:
        return column_moments(x, index, eps, nan_to_num, finalize=True)
    shift, mean, m2 = column_moments(x, index, eps, nan_to_num, finalize=False)
    return merge_and_finalize(x.shape[0], shift, mean, m2)


def batch_mse_forward(x, target, index, eps: float, mode: Mode, merge_and_finalize=None, weight=None,
                      embeddings=None):
    """(loss, moments [5, K] fp32, colsums [2, K] fp32, or [0, K] for reduction "none", whose backward sums
    with g itself: no launch to fill them). merge_and_finalize(count, c, m, M2) -> moments [5, K]
    turns this batch's moments into statistics over all ranks; None: this batch's own. embeddings [B, c]:
    a hybrid's objective over K + c columns (the statistics stay the K feature columns')."""
    B, K, reduction = x.shape[0], index.shape[0], mode.reduction
    moments = batch_moments(x, index, eps, mode.nan_to_num, merge_and_finalize)
    if B == 0:
        W = K + mode.gap.width if embeddings is not None else K
        shape = (0, W) if reduction == REDUCTION_NONE else (W,) if reduction == REDUCTION_COLUMN else ()
        return x.new_zeros(shape), moments, moments.new_zeros((2 if reduction else 0, K))
    loss, colsums = launch_forward(x, target, index, tuple(moments[:3]), mode._replace(norm=NORM_BATCH),
                                   colsums=reduction != REDUCTION_NONE, weight=weight, embeddings=embeddings)
    return loss, moments, colsums if colsums is not None else moments.new_empty((0, K))


def dz_sums(grad_loss, x, target, index, moments, nan_to_num: bool, gap, weight=None, embed=False):
    """(S1, S2) [2, K] fp32 of reduction "none" (target None: of clean_features, grad_loss = ∂L/∂z): Σ_b dz
    and Σ_b dz·z over these B rows."""
    clean = target is None
    target = x if clean else target  # never read: clean
    B, D = x.shape
    K = index.shape[0]
    sums = torch.empty((2, K), dtype=torch.float32, device=x.device)
    if B == 0:
        return sums.zero_()
    block_b, block_k, grid = walk_grid(x, B, K)
    with device_guard(x), scratch_guard(x):
        partial = torch.empty((grid[0], 2, K), dtype=torch.float32, device=x.device)
        _DZ_SUMS[grid](
            grad_loss, x, target, index, moments[0], moments[1], moments[2], x if weight is None else weight, partial,
            sums, scratch(x, grid[0])[0],
            B, K, D, grad_loss.stride(0), grad_loss.stride(1), x.stride(0), x.stride(1),
            target.stride(0), target.stride(1), gap.at, gap.width,
            NAN_TO_NUM=int(nan_to_num), CLEAN=int(clean), WEIGHTED=int(weight is not None), EMBED=int(embed),
            BLOCK_B=block_b, BLOCK_K=block_k,
            num_warps=num_warps_for(block_b, block_k),
        )  # fmt: skip
    return sums


def batch_mse_backward(grad_loss, x, target, columns: tuple, saved: tuple, mode: Mode, sum_over_ranks=None,
                       weight=None, embeddings=None):
    """(grad_x [B, D], grad_target [B, K (+ gap)]), and with embeddings grad_embeddings [B, c] third; columns
    (index, inv_ptr, inv_k), saved (moments, colsums) of the forward; sum_over_ranks([2, K]) -> [2, K] sums S
    over all ranks."""
    index, inv_ptr, inv_k = columns
    moments, colsums = saved
    B, K, reduction, needs, embed = x.shape[0], index.shape[0], mode.reduction, mode.needs, embeddings is not None
    sums, sums_final = colsums, False
    if reduction == REDUCTION_NONE:
        sums = dz_sums(grad_loss, x, target, index, moments, mode.nan_to_num, mode.gap, weight, embed)
        sums_final = True
    elif sum_over_ranks is not None:  # S = f·A, f the column's gradient factor (as the kernel forms it)
        f = grad_loss.float() * (2.0 * reduction_scale(reduction, B, K + mode.gap.width if embed else K))
        if weight is not None:  # (with embeddings: [K + c], the feature columns' around the gap)
            f = f * (torch.cat([weight[: mode.gap.at], weight[sum(mode.gap) :]]) if embed else weight)
        sums, sums_final = colsums * f, True
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums)
    if B == 0:
        grads = (x.new_zeros(x.shape) if needs[0] else None), (target.new_zeros(target.shape) if needs[1] else None)
        return (*grads, embeddings.new_zeros(embeddings.shape) if needs[2] else None) if embed else grads
    return launch_backward(grad_loss, x, target, (inv_ptr, inv_k), tuple(moments), mode._replace(norm=NORM_BATCH), sums,
                           sums_final, weight, embeddings)


def batch_clean_forward(x, index, eps: float, mode: Mode, merge_and_finalize=None):
    """clean_features, norm "batch": (z [B, K] in x.dtype, moments [5, K] fp32); two launches."""
    z, moments, _ = batch_mse_forward(x, None, index, eps, mode._replace(reduction=REDUCTION_NONE, clean=True),
                                    merge_and_finalize)
    return z, moments


def batch_clean_backward(grad_z, x, columns: tuple, moments, mode: Mode, sum_over_ranks=None):
    """clean_features, norm "batch": grad_x [B, D]; two launches (the sums S, then the gradient)."""
    index, inv_ptr, inv_k = columns
    sums = dz_sums(grad_z, x, None, index, moments, mode.nan_to_num, mode.gap)
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    mode = mode._replace(norm=NORM_BATCH, reduction=REDUCTION_NONE, clean=True)
    return launch_backward(grad_z, x, None, (inv_ptr, inv_k), tuple(moments), mode, sums, True)
