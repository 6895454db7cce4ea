"""Fused masked MSE, norm "none" / "stats": one launch forward, one launch backward, any B.

Math (reference.py states it in full): z[b, k] = (x̃[b, idx[k]] − shift[k]) · scale[k], e = (z − r)²,
loss = Σe/(B·K) | Σe | e. Plan:

forward   grid (cdiv(B, BLOCK_B),): each program owns BLOCK_B rows and walks the K kept columns in
          BLOCK_K chunks, gathering x through idx, so only the kept columns of x are ever read. For
          mean/sum it writes one fp32 partial sum; the last program to finish (an int32 ticket counter,
          not a float atomic) adds the partials in program order and writes the scalar: deterministic,
          one launch, no host sync.
backward  grid (cdiv(B, BLOCK_B), cdiv(D, BLOCK_D)): a gather over the D output columns through the
          inverse map (inv_ptr, inv_k): column d sums the gradients of the kept columns that read it
          (duplicates accumulate without atomics), every grad_x element is written exactly once (zeros
          in dropped columns, without reading x there), and each grad_r element is written by the one
          program that owns its column.
Both accumulate in fp32 and cast once on store; strides are arguments; row offsets are int64.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |v| <= FLT_MAX  ⇔  v is finite (false for NaN and ±Inf)


@triton.jit
def _masked_mse_fwd_kernel(
    x_ptr,  # [B, D] features, any strides, fp32/fp16/bf16
    r_ptr,  # [B, K] target, any strides, dtype of x
    idx_ptr,  # [K] int64: feature column read by kept column k
    shift_ptr,  # [K] fp32: μ (read only when NORM == 1)
    scale_ptr,  # [K] fp32: 1/σ (read only when NORM == 1)
    out_ptr,  # REDUCTION 0: [B, K] contiguous; else []: dtype of x
    partial_ptr,  # [num_programs] fp32 workspace (mean/sum)
    counter_ptr,  # [1] int32 ticket counter, 0 before and after every launch (mean/sum)
    B,
    K,
    D,
    stride_xb,
    stride_xd,
    stride_rb,
    stride_rk,
    out_scale,  # 1/(B·K) for mean, 1 for sum
    NORM: tl.constexpr,  # 0 none, 1 stats
    NAN_TO_NUM: tl.constexpr,  # 0/1
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # chunk of partials the last program adds at a time
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B] int64
    row_ok = rows < B
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] kept-column ids
        col_ok = cols < K
        d = tl.load(idx_ptr + cols, mask=col_ok, other=0)  # [BLOCK_K] feature columns
        col_ok = col_ok & (d >= 0) & (d < D)  # validated before launch; never read out of bounds
        ok = row_ok[:, None] & col_ok[None, :]
        xv = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=ok, other=0.0)
        xv = xv.to(tl.float32)
        if NAN_TO_NUM:
            xv = tl.where(tl.abs(xv) <= _FLT_MAX, xv, 0.0)
        if NORM == 1:
            mu = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
            inv_sigma = tl.load(scale_ptr + cols, mask=col_ok, other=1.0)
            xv = (xv - mu[None, :]) * inv_sigma[None, :]
        rv = tl.load(r_ptr + rows[:, None] * stride_rb + cols[None, :] * stride_rk, mask=ok, other=0.0)
        diff = xv - rv.to(tl.float32)
        err = tl.where(ok, diff * diff, 0.0)
        if REDUCTION == 0:
            out_offs = rows[:, None] * K + cols[None, :]
            tl.store(out_ptr + out_offs, err.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            acc += err
    if REDUCTION != 0:
        tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
        # Every thread's store is issued before the ticket; acq_rel publishes it to the last program.
        tl.debug_barrier()
        num_programs = tl.num_programs(0)
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == num_programs - 1:
            total = tl.zeros([BLOCK_P], dtype=tl.float32)
            for p0 in range(0, num_programs, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                # .cg: read through L2, where the other programs' partials are visible.
                total += tl.load(partial_ptr + p, mask=p < num_programs, other=0.0, cache_modifier=".cg")
            loss = tl.sum(total, axis=0) * out_scale
            tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (and for CUDA-graph replays)


@triton.jit
def _masked_mse_bwd_kernel(
    grad_ptr,  # ∂L/∂loss: [] (mean/sum) or [B, K] any strides (none)
    x_ptr,  # [B, D] features, any strides
    r_ptr,  # [B, K] target, any strides
    inv_ptr_ptr,  # [D+1] int32 CSR pointers: kept columns reading column d are inv_k[inv_ptr[d]:inv_ptr[d+1]]
    inv_k_ptr,  # [K] int32
    shift_ptr,  # [K] fp32 μ (NORM == 1)
    scale_ptr,  # [K] fp32 1/σ (NORM == 1)
    grad_x_ptr,  # [B, D] contiguous, dtype of x: written everywhere, zeros included
    grad_r_ptr,  # [B, K] contiguous, dtype of r
    B,
    K,
    D,
    stride_xb,
    stride_xd,
    stride_rb,
    stride_rk,
    stride_gb,
    stride_gk,
    grad_scale,  # 2/(B·K) for mean, 2 otherwise: ∂e/∂z = 2·diff folded in
    NORM: tl.constexpr,
    NAN_TO_NUM: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_ok = rows < B
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] feature columns
    d_ok = dcols < D
    start = tl.load(inv_ptr_ptr + dcols, mask=d_ok, other=0)
    count = tl.load(inv_ptr_ptr + dcols + 1, mask=d_ok, other=0) - start  # kept columns reading d
    # x is read only where some kept column reads it.
    x_ok = row_ok[:, None] & (count > 0)[None, :]
    xv = tl.load(x_ptr + rows[:, None] * stride_xb + dcols[None, :] * stride_xd, mask=x_ok, other=0.0)
    xv = xv.to(tl.float32)
    if NAN_TO_NUM:
        finite = tl.abs(xv) <= _FLT_MAX
        xv = tl.where(finite, xv, 0.0)
    if REDUCTION != 0:
        g = tl.load(grad_ptr).to(tl.float32) * grad_scale
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):  # 1 pass without duplicates
        has = j < count
        k = tl.load(inv_k_ptr + start + j, mask=has, other=0).to(tl.int64)  # [BLOCK_D]
        ok = row_ok[:, None] & has[None, :]
        rv = tl.load(r_ptr + rows[:, None] * stride_rb + k[None, :] * stride_rk, mask=ok, other=0.0)
        z = xv
        if NORM == 1:
            mu = tl.load(shift_ptr + k, mask=has, other=0.0)
            inv_sigma = tl.load(scale_ptr + k, mask=has, other=1.0)
            z = (xv - mu[None, :]) * inv_sigma[None, :]
        if REDUCTION == 0:
            gk = tl.load(grad_ptr + rows[:, None] * stride_gb + k[None, :] * stride_gk, mask=ok, other=0.0)
            dz = (z - rv.to(tl.float32)) * (gk.to(tl.float32) * grad_scale)
        else:
            dz = (z - rv.to(tl.float32)) * g
        tl.store(grad_r_ptr + rows[:, None] * K + k[None, :], (-dz).to(grad_r_ptr.dtype.element_ty), mask=ok)
        if NORM == 1:
            dz = dz * inv_sigma[None, :]
        acc += tl.where(ok, dz, 0.0)
    if NAN_TO_NUM:
        acc = tl.where(finite, acc, 0.0)
    out_ok = row_ok[:, None] & d_ok[None, :]
    tl.store(grad_x_ptr + rows[:, None] * D + dcols[None, :], acc.to(grad_x_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------- launchers

_TILE_ELEMENTS = 2048  # elements per program tile: 16 a thread at 4 warps, no spills (tests/aot_check.py)
_MAX_BLOCK_COLS = 256
_BLOCK_P = 1024
_counters: dict[tuple, torch.Tensor] = {}


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _ticket_counter(t: torch.Tensor) -> torch.Tensor:
    """The int32 counter of the last-program reduction, one per (device, stream), zero between launches.

    Kept rather than allocated per call so a launch needs no memset launch; per stream so concurrent
    launches on two streams never share one.
    """
    stream = torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0
    key = (t.device, stream)
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = torch.zeros(1, dtype=torch.int32, device=t.device)
    return counter


def block_sizes(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for a [rows, cols] walk: cols up to 256 wide, ~2048 elements a tile."""
    block_cols = min(triton.next_power_of_2(cols), _MAX_BLOCK_COLS)
    block_rows = max(1, min(_TILE_ELEMENTS // block_cols, triton.next_power_of_2(rows)))
    return block_rows, block_cols


def _stats_args(shift, scale, like):
    if shift is None:
        return like, like, 0  # never read: NORM == 0
    return shift, scale, 1


def masked_mse_forward(
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64, values in [0, D)
    shift,  # [K] fp32 or None
    scale,  # [K] fp32 or None
    nan_to_num: bool,
    reduction: int,  # 0 none, 1 mean, 2 sum
) -> torch.Tensor:
    """The loss ([] or [B, K] in x.dtype); inputs are validated by the caller."""
    B, D = x.shape
    K = index.shape[0]
    block_b, block_k = block_sizes(B, K)
    grid = (triton.cdiv(B, block_b),)
    shift, scale, norm = _stats_args(shift, scale, x)
    with _device_guard(x):
        if reduction == 0:
            out = torch.empty((B, K), dtype=x.dtype, device=x.device)
            partial = counter = out  # unused
        else:
            out = torch.empty((), dtype=x.dtype, device=x.device)
            partial = torch.empty(grid[0], dtype=torch.float32, device=x.device)
            counter = _ticket_counter(x)
        _masked_mse_fwd_kernel[grid](
            x, target, index, shift, scale, out, partial, counter,
            B, K, D,
            x.stride(0), x.stride(1), target.stride(0), target.stride(1),
            1.0 / (B * K) if reduction == 1 else 1.0,
            NORM=norm, NAN_TO_NUM=int(nan_to_num), REDUCTION=reduction,
            BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_P=_BLOCK_P,
        )  # fmt: skip
    return out


def masked_mse_backward(
    grad_loss: torch.Tensor,  # [] or [B, K]
    x: torch.Tensor,  # [B, D]
    target: torch.Tensor,  # [B, K]
    inv_ptr: torch.Tensor,  # [D+1] int32
    inv_k: torch.Tensor,  # [K] int32
    shift,
    scale,
    nan_to_num: bool,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [B, D] in x.dtype, grad_target [B, K] in target.dtype), both freshly allocated."""
    B, D = x.shape
    K = inv_k.shape[0]
    block_b, block_d = block_sizes(B, D)
    grid = (triton.cdiv(B, block_b), triton.cdiv(D, block_d))
    shift, scale, norm = _stats_args(shift, scale, x)
    g_strides = (grad_loss.stride(0), grad_loss.stride(1)) if reduction == 0 else (0, 0)
    with _device_guard(x):
        grad_x = torch.empty((B, D), dtype=x.dtype, device=x.device)
        grad_target = torch.empty((B, K), dtype=target.dtype, device=x.device)
        _masked_mse_bwd_kernel[grid](
            grad_loss, x, target, inv_ptr, inv_k, shift, scale, grad_x, grad_target,
            B, K, D,
            x.stride(0), x.stride(1), target.stride(0), target.stride(1), *g_strides,
            2.0 / (B * K) if reduction == 1 else 2.0,
            NORM=norm, NAN_TO_NUM=int(nan_to_num), REDUCTION=reduction,
            BLOCK_B=block_b, BLOCK_D=block_d,
        )  # fmt: skip
    return grad_x, grad_target
