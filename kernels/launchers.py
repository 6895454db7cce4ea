"""The launches of masked_mse.py's two kernels, which every norm builds on (batch_norm.py wraps norm="batch"
around them), and the entry points of norm "none" / "stats" (the loss and clean_features).

    launch_forward   grid (min(cdiv(B, BLOCK_B), programs),): the loss (a scalar, [K] or [B, K]), or z (clean)
    launch_backward  grid (cdiv(B, BLOCK_B), cdiv(D, BLOCK_D)): grad_x (and grad_r for the loss)
Inputs are validated by the caller; every launch runs under the tensors' device and never synchronizes.
affine: () for norm "none", (μ, 1/σ) for "stats", (c, m, 1/σ') forward / (c, m, 1/σ', 1/(N − 1), 1/N)
backward for "batch", each [K] fp32. mode: plan.Mode.
"""

from __future__ import annotations

import torch

from .masked_mse import _masked_mse_bwd_kernel, _masked_mse_fwd_kernel
from .plan import NORM_BATCH, NORM_NONE, NORM_STATS, REDUCTION_COLUMN, REDUCTION_NONE, KernelLauncher, Mode
from .plan import device_guard, reduction_scale
from .tiles import BLOCK_P, TUNING, block_sizes, cdiv, num_warps_for, scratch, scratch_guard, walk_grid


def launch_forward(
    x: torch.Tensor,  # [B, D], B >= 1
    target,  # [B, K (+ c)], or None (clean)
    index: torch.Tensor,  # [K] int64, values in [0, D)
    affine: tuple,  # [K] fp32 views: () none, (μ, 1/σ) stats, (c, m, 1/σ') batch
    mode: Mode,
    colsums: bool = False,  # also return the [2, K] column sums of the batch-norm backward
    weight=None,  # [W] fp32: the loss's per-column weights, or None
    embeddings=None,  # [B, mode.gap.width]: a hybrid's objective, over W = K + gap.width columns; None: W = K
):
    """(loss [] / [W] (column) / [B, W] in x.dtype, or z [B, K]; colsums [2, K] fp32 or None); inputs
    validated by the caller."""
    B, D = x.shape
    K = index.shape[0]
    W = K + mode.gap.width if embeddings is not None else K
    block_b, block_k, grid = walk_grid(x, B, K)
    norm, nan_to_num, reduction, gap, _, clean = mode
    if norm == NORM_BATCH:
        shift, center, scale = affine
    else:
        shift, scale = affine if affine else (x, x)  # unused slots: any pointer, never read
        center = shift
    if target is None:
        target = x  # never read: clean
    with device_guard(x), scratch_guard(x):
        column_partial = x  # unused unless reduction "column"
        if reduction == REDUCTION_NONE:
            out = torch.empty((B, W), dtype=x.dtype, device=x.device)
            partial = counter = out  # unused
        else:
            out = torch.empty((W,) if reduction == REDUCTION_COLUMN else (), dtype=x.dtype, device=x.device)
            counter, partial = scratch(x, grid[0])
            if reduction == REDUCTION_COLUMN:
                column_partial = torch.empty((grid[0], W), dtype=torch.float32, device=x.device)
        if colsums:
            sums = torch.empty((2, K), dtype=torch.float32, device=x.device)
            sums_partial = torch.empty((grid[0], 2, K), dtype=torch.float32, device=x.device)
        else:
            sums = sums_partial = partial  # unused
        emb = x if embeddings is None else embeddings  # (x: never read)
        _FWD[grid](
            x, target, emb, index, shift, center, scale, x if weight is None else weight, out, partial,
            column_partial, sums_partial, sums, counter,
            B, K, D,
            x.stride(0), x.stride(1), target.stride(0), target.stride(1), emb.stride(0), emb.stride(1),
            gap.at, gap.width, reduction_scale(reduction, B, W),
            NORM=norm, NAN_TO_NUM=int(nan_to_num), REDUCTION=reduction, WEIGHTED=int(weight is not None),
            COLSUMS=int(colsums), CLEAN=int(clean), EMBED=int(embeddings is not None),
            BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_P=BLOCK_P, num_warps=num_warps_for(block_b, block_k),
        )  # fmt: skip
    return out, (sums if colsums else None)


def launch_backward(
    grad_loss: torch.Tensor,  # [] or [B, K]; clean: ∂L/∂z [B, K]
    x: torch.Tensor,  # [B, D], B >= 1
    target,  # [B, K (+ c)], or None (clean)
    inverse: tuple,  # (inv_ptr [D+1] int32, inv_k [K] int32)
    affine: tuple,  # [K] fp32 views: () none, (μ, 1/σ) stats, (c, m, 1/σ', 1/(N − 1), 1/N) batch
    mode: Mode,
    sums=None,  # batch: [2, K] fp32, (A1, A2) of the forward or, with sums_final, (S1, S2)
    sums_final: bool = False,
    weight=None,  # [W] fp32: the loss's per-column weights, or None
    embeddings=None,  # [B, c]: a hybrid's objective (launch_forward's)
):
    """(grad_x [B, D] in x.dtype, grad_target [B, K (+ c)] in target.dtype), freshly allocated, None where not
    wanted, and with embeddings grad_embeddings [B, c] (mode.needs[2]) third; clean: grad_x."""
    inv_ptr, inv_k = inverse
    norm, nan_to_num, reduction, gap, needs, clean = mode
    B, D = x.shape
    K = inv_k.shape[0]
    embed = embeddings is not None
    block_b, block_d = block_sizes(B, D, TUNING.backward_tile)
    grid = (cdiv(B, block_b), cdiv(D, block_d) + (cdiv(gap.width, block_d) if embed else 0))
    if norm == NORM_BATCH:
        shift, center, scale, inv_n1, inv_n = affine
    else:
        shift, scale = affine if affine else (x, x)  # unused slots: any pointer, never read
        center = inv_n1 = inv_n = x
    sums = x if sums is None else sums
    g_strides = ((grad_loss.stride(0), grad_loss.stride(1)) if reduction == REDUCTION_NONE else
                 (0, grad_loss.stride(0)) if reduction == REDUCTION_COLUMN else (0, 0))
    want_x, want_r, want_e = needs[0], needs[1] and not clean, embed and needs[2]
    with device_guard(x):
        grad_x = torch.empty((B, D), dtype=x.dtype, device=x.device) if want_x else None
        grad_target = grad_e = None
        if clean:
            target = x  # never read
        elif want_r:
            grad_target = torch.empty((B, K + gap.width), dtype=target.dtype, device=x.device)
            if gap.width and not embed:  # the kernel writes the K loss columns; the skipped ones get zeros here
                grad_target[:, gap.at : gap.at + gap.width].zero_()
        if want_e:
            grad_e = torch.empty((B, gap.width), dtype=embeddings.dtype, device=x.device)
        emb = embeddings if embed else x  # (x: never read)
        _BWD[grid](
            grad_loss, x, target, emb, inv_ptr, inv_k, shift, center, scale, inv_n1, inv_n, sums,
            x if weight is None else weight,
            x if grad_x is None else grad_x, x if grad_target is None else grad_target,  # (x: never written)
            x if grad_e is None else grad_e,
            B, K, D,
            x.stride(0), x.stride(1), target.stride(0), target.stride(1), emb.stride(0), emb.stride(1),
            gap.at, gap.width, *g_strides,
            1.0 if clean else 2.0 * reduction_scale(reduction, B, K + gap.width if embed else K),
            NORM=norm, NAN_TO_NUM=int(nan_to_num), REDUCTION=reduction, WEIGHTED=int(weight is not None),
            SUMS_FINAL=int(sums_final), CLEAN=int(clean), WRITE_X=int(want_x), WRITE_R=int(want_r),
            EMBED=int(embed), WRITE_E=int(want_e), BLOCK_B=block_b, BLOCK_D=block_d,
            num_warps=num_warps_for(block_b, block_d),
        )  # fmt: skip
    if clean:
        return grad_x
    return (grad_x, grad_target, grad_e) if embed else (grad_x, grad_target)


_FWD = KernelLauncher(_masked_mse_fwd_kernel)
_BWD = KernelLauncher(_masked_mse_bwd_kernel)


def masked_mse_forward(x, target, index, affine: tuple, mode: Mode, weight=None, embeddings=None) -> torch.Tensor:
    """norm "none" (affine ()) or "stats" ((μ, 1/σ)): the loss ([], [W] or [B, W] in x.dtype, W = K, or K + c
    with embeddings [B, c]); by whole-row loads (row_loads.py) when TUNING.forward_loads == "rows", the rows
    fit and no embeddings are compared."""
    if TUNING.forward_loads == "rows" and embeddings is None:
        from .row_loads import rows_fit, rows_forward

        if rows_fit(x, target):
            return rows_forward(x, target, index, affine, mode, weight)
    norm = NORM_STATS if affine else NORM_NONE
    mode = mode if mode.norm == norm else mode._replace(norm=norm)  # (the host passes it right: µs at B = 4)
    return launch_forward(x, target, index, affine, mode, weight=weight, embeddings=embeddings)[0]


def masked_mse_backward(grad_loss, x, target, inverse: tuple, affine: tuple, mode: Mode, weight=None,
                        embeddings=None):
    """norm "none" / "stats": (grad_x [B, D], grad_target [B, K] or [B, K + c]), None where not needed, and
    with embeddings grad_embeddings [B, c] third."""
    norm = NORM_STATS if affine else NORM_NONE
    mode = mode if mode.norm == norm else mode._replace(norm=norm)
    return launch_backward(grad_loss, x, target, inverse, affine, mode, weight=weight, embeddings=embeddings)


def clean_forward(x, index, affine: tuple, mode: Mode) -> torch.Tensor:
    """clean_features, norm "none" (affine ()) or "stats": z [B, K] in x.dtype, one launch."""
    if x.shape[0] == 0:
        return x.new_empty((0, index.shape[0]))
    mode = mode._replace(norm=NORM_STATS if affine else NORM_NONE, reduction=REDUCTION_NONE, clean=True)
    return launch_forward(x, None, index, affine, mode)[0]


def clean_backward(grad_z, x, inverse: tuple, affine: tuple, mode: Mode) -> torch.Tensor:
    """clean_features, norm "none" / "stats": grad_x [B, D], one launch."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    mode = mode._replace(norm=NORM_STATS if affine else NORM_NONE, reduction=REDUCTION_NONE, clean=True)
    return launch_backward(grad_z, x, None, inverse, affine, mode)
