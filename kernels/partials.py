"""P partial reconstructions against one target: one launch forward, one launch backward, for any P.

Math (fusedvq/reference.py's partials_composed states the same in torch ops): z [B, K] the cleaned target,
r [P, B, W] the partials, W = K + gap, partial column w compared with z's column k = w − gap·[w ≥ at + gap]
and the gap's columns at .. at + gap − 1 skipped:
    forward   E[p, k] = Σ_b (r[p, b, w] − z[b, k])² / B            (REDUCTION column: [P, K])
              loss = Σ_{p, b, k} (r − z)² / (P·B·K)                  (REDUCTION mean)
    VJP       g = grad_out/(P·B·K) | grad_out[p, k]/B
              ∂L/∂r[p, b, w] = 2·g·(r − z)  (0 in the gap),   ∂L/∂z[b, k] = −Σ_p 2·g·(r − z)
EMBED (a hybrid's objective, embeddings e [B, gap] read in place): the gap's columns compare with e[b, w − at]
instead of being skipped, so every column w compares with combined(z, e)[b, w]; the errors are [P, W] in
the partials' column order, the mean divides by P·B·W, and ∂L/∂e = −Σ_p 2·g·(r − e) on the gap's columns.
Plan:
forward   grid (P, n): program (p, i) owns partial p's row blocks i, i + n, ... (programs of one row block
          but different partials are launched side by side, so z's rows come from L2), walks the W columns in
          BLOCK_W chunks and writes its Σ (r − z)²: one fp32 number (mean) or one per column (column) to a
          workspace; the last program to finish (an int32 ticket, not a float atomic) adds them in program
          order: deterministic, no host synchronization.
backward  grid (cdiv(B, BLOCK_B), cdiv(W, BLOCK_W)): a program owns a tile of rows and columns, reads z's tile
          once and every partial's tile once, writes each grad_r element once (zeros in the gap included)
          and grad_z's (or, on the gap's columns with EMBED, grad_e's) tile once, its −Σ_p in registers: no
          atomics, no second pass.
fp32 accumulation, outputs cast once on store; strides are arguments (no copies); row offsets int64.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launchers import KernelLauncher, device_guard
from .plan import REDUCTION_COLUMN, REDUCTION_MEAN, Gap
from .tiles import BLOCK_P, TUNING, block_sizes, cdiv, max_programs, num_warps_for, scratch, scratch_guard
from .tiles import sum_partial_columns, write_reduction

REDUCTION_COLUMN_C = tl.constexpr(REDUCTION_COLUMN)


@triton.jit
def partial_columns(w0, W, K, gap_at, gap_width, EMBED: tl.constexpr, BLOCK_W: tl.constexpr):
    """Partial columns w0 .. w0 + BLOCK_W: (w, the z column k each compares with, from_z (in range, not in
    the gap), from_e (EMBED: in the gap; compared with embedding column w − gap_at), the column of the
    errors each adds to (EMBED: w, else k), in range)."""
    w = w0 + tl.arange(0, BLOCK_W)
    w_ok = w < W
    in_gap = (w >= gap_at) & (w < gap_at + gap_width)
    k = w - tl.where(w >= gap_at + gap_width, gap_width, 0)
    from_z = w_ok & (~in_gap) & (k >= 0) & (k < K)
    if EMBED:
        from_e = w_ok & in_gap
        out = w
    else:
        from_e = w < 0  # (none)
        out = k
    return w.to(tl.int64), k.to(tl.int64), from_z, from_e, out.to(tl.int64), w_ok


@triton.jit
def target_tile(z_ptr, emb_ptr, rows, row_ok, w, k, from_z, from_e, gap_at, stride_zb, stride_zk, stride_eb,
                stride_ec, EMBED: tl.constexpr):
    """combined(z, e) [BLOCK_B, BLOCK_W] in fp32 at partial columns w: z's column k where from_z, the
    embeddings' column w − gap_at where from_e (EMBED), 0 elsewhere; each read in place."""
    t = tl.load(z_ptr + rows[:, None] * stride_zb + k[None, :] * stride_zk, mask=row_ok[:, None] & from_z[None, :],
                other=0.0).to(tl.float32)
    if EMBED:
        t += tl.load(emb_ptr + rows[:, None] * stride_eb + (w - gap_at)[None, :] * stride_ec,
                     mask=row_ok[:, None] & from_e[None, :], other=0.0).to(tl.float32)
    return t


@triton.jit
def _partials_fwd_kernel(
    z_ptr,  # [B, K] the cleaned target, any strides, fp32/fp16/bf16
    r_ptr,  # [P, B, W] the partials, any strides, dtype of z
    emb_ptr,  # [B, gap_width] the embeddings, any strides, dtype of z (EMBED)
    out_ptr,  # [] (mean) or [P, KO] contiguous (column), dtype of z
    workspace_ptr,  # [P·n] fp32 workspace (mean): each program's Σ (r − z)²
    column_workspace_ptr,  # [P·n, KO] fp32 workspace (column): each program's Σ_b (r − z)² per column
    counter_ptr,  # [1] int32 ticket counter, 0 before and after every launch
    B,
    K,
    W,
    KO,  # the errors' columns: K, or W with EMBED
    stride_zb,
    stride_zk,
    stride_rp,
    stride_rb,
    stride_rw,
    stride_eb,
    stride_ec,
    gap_at,  # the partials' columns gap_at .. gap_at + gap_width − 1: skipped (a hybrid decoder's embeddings), or
    gap_width,  # compared with the embeddings (EMBED)
    out_scale,  # 1/(P·B·KO) for mean, 1/B for column
    REDUCTION: tl.constexpr,  # 1 mean, 3 column
    EMBED: tl.constexpr,  # 0/1: the gap's columns compared with emb
    BLOCK_B: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_P: tl.constexpr,  # chunk of workspace entries the last program adds at a time
):
    p = tl.program_id(0)
    i = tl.program_id(1)
    n = tl.num_programs(1)
    slot = p * n + i  # this program's workspace entry: partial-major, so each partial's entries are adjacent
    row_blocks = tl.cdiv(B, BLOCK_B)
    r_base = r_ptr + p.to(tl.int64) * stride_rp
    total = tl.zeros([BLOCK_B, BLOCK_W], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        w, k, from_z, from_e, o, _ = partial_columns(w0, W, K, gap_at, gap_width, EMBED, BLOCK_W)
        compared = from_z | from_e
        squares = tl.zeros([BLOCK_B, BLOCK_W], dtype=tl.float32)
        for rb in range(i, row_blocks, n):  # a fixed order: deterministic sums
            rows = tl.arange(0, BLOCK_B).to(tl.int64) + rb * BLOCK_B
            row_ok = rows < B
            rv = tl.load(r_base + rows[:, None] * stride_rb + w[None, :] * stride_rw,
                         mask=row_ok[:, None] & compared[None, :], other=0.0)
            tv = target_tile(z_ptr, emb_ptr, rows, row_ok, w, k, from_z, from_e, gap_at, stride_zb, stride_zk,
                             stride_eb, stride_ec, EMBED)
            diff = rv.to(tl.float32) - tv
            squares += diff * diff
        if REDUCTION == REDUCTION_COLUMN_C:
            tl.store(column_workspace_ptr + slot.to(tl.int64) * KO + o, tl.sum(squares, axis=0), mask=compared)
        else:
            total += squares
    if REDUCTION != REDUCTION_COLUMN_C:
        tl.store(workspace_ptr + slot, tl.sum(tl.sum(total, axis=1), axis=0))
    # Every thread's stores are issued before the ticket; acq_rel publishes them to the last program.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) * n - 1:
        if REDUCTION == REDUCTION_COLUMN_C:
            for q in range(0, tl.num_programs(0)):  # out[q, :] = Σ_i workspace[q·n + i, :], in order
                sum_partial_columns(column_workspace_ptr + q * n * KO, out_ptr, out_ptr + q * KO, n, KO,
                                    out_scale, False, BLOCK_W)
        else:
            write_reduction(workspace_ptr, column_workspace_ptr, out_ptr, out_ptr, tl.num_programs(0) * n, KO,
                            out_scale, REDUCTION, False, BLOCK_W, BLOCK_P)
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (and for CUDA-graph replays)


@triton.jit
def _partials_bwd_kernel(
    grad_ptr,  # ∂L/∂loss: [] (mean) or [P, KO] any strides (column)
    z_ptr,  # [B, K] any strides
    r_ptr,  # [P, B, W] any strides
    emb_ptr,  # [B, gap_width] any strides (EMBED)
    grad_z_ptr,  # [B, K] contiguous, dtype of z (WRITE_Z)
    grad_r_ptr,  # [P, B, W] contiguous, dtype of r, written everywhere, the gap's zeros included (WRITE_R)
    grad_e_ptr,  # [B, gap_width] contiguous, dtype of emb (WRITE_E)
    P,
    B,
    K,
    W,
    stride_zb,
    stride_zk,
    stride_rp,
    stride_rb,
    stride_rw,
    stride_eb,
    stride_ec,
    stride_gp,
    stride_gk,
    gap_at,
    gap_width,
    grad_scale,  # 2/(P·B·KO) for mean, 2/B for column: ∂e/∂r = 2·diff folded in
    REDUCTION: tl.constexpr,
    EMBED: tl.constexpr,  # 0/1: the gap's columns compared with emb
    WRITE_Z: tl.constexpr,  # 0/1: grad_z wanted
    WRITE_R: tl.constexpr,  # 0/1: grad_r wanted
    WRITE_E: tl.constexpr,  # 0/1: grad_e wanted (EMBED)
    BLOCK_B: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    w0 = tl.program_id(1) * BLOCK_W
    w, k, from_z, from_e, o, w_ok = partial_columns(w0, W, K, gap_at, gap_width, EMBED, BLOCK_W)
    compared = from_z | from_e
    ok = row_ok[:, None] & compared[None, :]
    zv = target_tile(z_ptr, emb_ptr, rows, row_ok, w, k, from_z, from_e, gap_at, stride_zb, stride_zk, stride_eb,
                     stride_ec, EMBED)  # (combined(z, e): z's columns, and the embeddings' with EMBED)
    if REDUCTION != REDUCTION_COLUMN_C:
        g = tl.load(grad_ptr).to(tl.float32) * grad_scale
    grad_z = tl.zeros([BLOCK_B, BLOCK_W], dtype=tl.float32)
    r_tile = r_ptr + rows[:, None] * stride_rb + w[None, :] * stride_rw  # partial p's tile: + p·stride_rp
    out_tile = grad_r_ptr + rows[:, None] * W + w[None, :]  # + p·B·W
    for p in range(0, P):
        rv = tl.load(r_tile, mask=ok, other=0.0).to(tl.float32)
        r_tile += stride_rp  # (pointer steps: 64-bit offsets whatever P·B·W)
        if REDUCTION == REDUCTION_COLUMN_C:
            g = tl.load(grad_ptr + p * stride_gp + o * stride_gk, mask=compared, other=0.0).to(tl.float32) * grad_scale
            dr = tl.where(ok, g[None, :] * (rv - zv), 0.0)
        else:
            dr = tl.where(ok, g * (rv - zv), 0.0)
        if WRITE_R:
            tl.store(out_tile, dr.to(grad_r_ptr.dtype.element_ty), mask=row_ok[:, None] & w_ok[None, :])
            out_tile += B * W
        grad_z -= dr
    if WRITE_Z:
        tl.store(grad_z_ptr + rows[:, None] * K + k[None, :], grad_z.to(grad_z_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & from_z[None, :])
    if WRITE_E:
        tl.store(grad_e_ptr + rows[:, None] * gap_width + (w - gap_at)[None, :], grad_z.to(grad_e_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & from_e[None, :])


_FWD = KernelLauncher(_partials_fwd_kernel)
_BWD = KernelLauncher(_partials_bwd_kernel)


def partials_forward(z: torch.Tensor, partials: torch.Tensor, reduction: int, gap: Gap,
                     embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss in z's dtype: [] (mean) or [P, K] (column; [P, W] with embeddings [B, gap.width], read in place);
    one launch. Inputs validated by the caller."""
    P, B, W = partials.shape
    K = z.shape[1]
    KO = K if embeddings is None else W
    emb = z if embeddings is None else embeddings  # (z: never read)
    block_b, block_w = block_sizes(B, W, TUNING.walk_tile)
    n = max(1, min(cdiv(B, block_b), max_programs(z) // P))
    column = reduction == REDUCTION_COLUMN
    with device_guard(z), scratch_guard(z):
        out = torch.empty((P, KO) if column else (), dtype=z.dtype, device=z.device)
        counter, workspace = scratch(z, P * n)
        column_workspace = torch.empty((P * n, KO), dtype=torch.float32, device=z.device) if column else workspace
        _FWD[(P, n)](
            z, partials, emb, out, workspace, column_workspace, counter,
            B, K, W, KO, z.stride(0), z.stride(1), partials.stride(0), partials.stride(1), partials.stride(2),
            emb.stride(0), emb.stride(1), gap.at, gap.width, 1.0 / B if column else 1.0 / (P * B * KO),
            REDUCTION=REDUCTION_COLUMN if column else REDUCTION_MEAN, EMBED=int(embeddings is not None),
            BLOCK_B=block_b, BLOCK_W=block_w, BLOCK_P=BLOCK_P, num_warps=num_warps_for(block_b, block_w),
        )  # fmt: skip
    return out


def partials_backward(grad: torch.Tensor, z: torch.Tensor, partials: torch.Tensor, reduction: int, gap: Gap,
                      needs: tuple, embeddings: Optional[torch.Tensor] = None):
    """(grad_z [B, K], grad_partials [P, B, W]), and with embeddings [B, gap.width] their gradient third (needs[2]),
    freshly allocated and contiguous, None where needs says not; one launch."""
    P, B, W = partials.shape
    K = z.shape[1]
    column, embed = reduction == REDUCTION_COLUMN, embeddings is not None
    emb = embeddings if embed else z  # (z: never read)
    block_b, block_w = block_sizes(B, W, TUNING.backward_tile)
    g_strides = (grad.stride(0), grad.stride(1)) if column else (0, 0)
    with device_guard(z):
        grad_z = torch.empty((B, K), dtype=z.dtype, device=z.device) if needs[0] else None
        grad_r = torch.empty((P, B, W), dtype=partials.dtype, device=z.device) if needs[1] else None
        grad_e = torch.empty((B, gap.width), dtype=emb.dtype, device=z.device) if embed and needs[2] else None
        _BWD[(cdiv(B, block_b), cdiv(W, block_w))](
            grad, z, partials, emb, *(z if t is None else t for t in (grad_z, grad_r, grad_e)),  # (z: never written)
            P, B, K, W, z.stride(0), z.stride(1), partials.stride(0), partials.stride(1), partials.stride(2),
            emb.stride(0), emb.stride(1), *g_strides, gap.at, gap.width,
            2.0 / B if column else 2.0 / (P * B * (W if embed else K)),
            REDUCTION=REDUCTION_COLUMN if column else REDUCTION_MEAN, EMBED=int(embed), WRITE_Z=int(needs[0]),
            WRITE_R=int(needs[1]), WRITE_E=int(grad_e is not None), BLOCK_B=block_b, BLOCK_W=block_w,
            num_warps=num_warps_for(block_b, block_w),
        )  # fmt: skip
    return (grad_z, grad_r, grad_e) if embed else (grad_z, grad_r)
