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
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import KernelLauncher, cdiv, current_stream_handle, device_guard, next_power_of_2

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |v| <= FLT_MAX  ⇔  v is finite (false for NaN and ±Inf)


@triton.jit
def _kept_columns(idx_ptr, k0, K, D, BLOCK_K: tl.constexpr):
    """Kept columns k0 .. k0 + BLOCK_K: (ids [BLOCK_K], their feature columns d, in-range mask)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    d = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    col_ok = col_ok & (d >= 0) & (d < D)  # validated before launch; never read out of bounds
    return cols, d, col_ok


@triton.jit
def _store_partial_pair(partial_ptr, pid, cols, col_ok, K, a, b):
    """Program pid's column sums a, b [BLOCK_B, BLOCK_K] → partial[pid, 0 | 1, cols] ([P, 2, K] fp32)."""
    base = partial_ptr + pid.to(tl.int64) * 2 * K + cols
    tl.store(base, tl.sum(a, axis=0), mask=col_ok)
    tl.store(base + K, tl.sum(b, axis=0), mask=col_ok)


@triton.jit
def _sum_partial_pairs(partial_ptr, out_ptr, num_programs, K, BLOCK_K: tl.constexpr):
    """out [2, K] = Σ_p partial[p] in program order (deterministic); run by the last program only."""
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        t0 = tl.zeros([BLOCK_K], dtype=tl.float32)
        t1 = tl.zeros([BLOCK_K], dtype=tl.float32)
        for p in range(0, num_programs):
            base = partial_ptr + p * 2 * K + cols
            # .cg: read through L2, where the other programs' partials are visible.
            t0 += tl.load(base, mask=col_ok, other=0.0, cache_modifier=".cg")
            t1 += tl.load(base + K, mask=col_ok, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + cols, t0, mask=col_ok)
        tl.store(out_ptr + K + cols, t1, mask=col_ok)


@triton.jit
def _masked_mse_fwd_kernel(
    x_ptr,  # [B, D] features, any strides, fp32/fp16/bf16
    r_ptr,  # [B, K] target, any strides, dtype of x
    idx_ptr,  # [K] int64: feature column read by kept column k
    shift_ptr,  # [K] fp32: μ (NORM 1), or the batch moments' shift c (NORM 2)
    center_ptr,  # [K] fp32: m, the batch mean around c (NORM 2): z = ((x − c) − m)·(1/σ')
    scale_ptr,  # [K] fp32: 1/σ (NORM >= 1)
    out_ptr,  # REDUCTION 0: [B, K] contiguous; else []: dtype of x
    partial_ptr,  # [num_programs] fp32 workspace (mean/sum)
    colsum_partial_ptr,  # [num_programs, 2, K] fp32 workspace (COLSUMS)
    colsum_ptr,  # [2, K] fp32 out: (Σ_b diff·m, Σ_b diff·m·z), m = finite-z mask (COLSUMS)
    counter_ptr,  # [1] int32 ticket counter, 0 before and after every launch (mean/sum)
    B,
    K,
    D,
    stride_xb,
    stride_xd,
    stride_rb,
    stride_rk,
    out_scale,  # 1/(B·K) for mean, 1 for sum
    NORM: tl.constexpr,  # 0 none, 1 stats, 2 batch (stats from the batch; z passes through nan_to_num)
    NAN_TO_NUM: tl.constexpr,  # 0/1
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    COLSUMS: tl.constexpr,  # 0/1: also the column sums the batch-norm backward needs (NORM 2, mean/sum)
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # chunk of partials the last program adds at a time
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    row_blocks = tl.cdiv(B, BLOCK_B)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols, d, col_ok = _kept_columns(idx_ptr, k0, K, D, BLOCK_K)  # [BLOCK_K] each
        if NORM >= 1:
            mu = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
            inv_sigma = tl.load(scale_ptr + cols, mask=col_ok, other=1.0)
        if NORM == 2:
            center = tl.load(center_ptr + cols, mask=col_ok, other=0.0)
        if COLSUMS:
            sum_m = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            sum_mz = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        # Persistent: this program owns row blocks pid, pid + P, ... (a fixed order: deterministic sums).
        for rb in range(pid, row_blocks, num_programs):
            rows = tl.arange(0, BLOCK_B).to(tl.int64) + rb * BLOCK_B  # [BLOCK_B] int64 (rb·BLOCK_B < B + BLOCK_B fits int32)
            ok = (rows < B)[:, None] & col_ok[None, :]
            xv = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=ok, other=0.0)
            z = xv.to(tl.float32)
            if NAN_TO_NUM:
                z = tl.where(tl.abs(z) <= _FLT_MAX, z, 0.0)
            if NORM == 1:
                z = (z - mu[None, :]) * inv_sigma[None, :]
            if NORM == 2:
                z = ((z - mu[None, :]) - center[None, :]) * inv_sigma[None, :]
                z_ok = tl.abs(z) <= _FLT_MAX
                z = tl.where(z_ok, z, 0.0)
            rv = tl.load(r_ptr + rows[:, None] * stride_rb + cols.to(tl.int64)[None, :] * stride_rk, mask=ok, other=0.0)
            diff = tl.where(ok, z - rv.to(tl.float32), 0.0)
            if REDUCTION == 0:
                out_offs = rows[:, None] * K + cols[None, :]
                tl.store(out_ptr + out_offs, (diff * diff).to(out_ptr.dtype.element_ty), mask=ok)
            else:
                acc += diff * diff
            if COLSUMS:
                m = tl.where(z_ok, diff, 0.0)
                sum_m += m
                sum_mz += m * z
        if COLSUMS:
            _store_partial_pair(colsum_partial_ptr, pid, cols, col_ok, K, sum_m, sum_mz)
    if REDUCTION != 0:
        tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
        # Every thread's stores are issued before the ticket; acq_rel publishes them to the last program.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == num_programs - 1:
            total = tl.zeros([BLOCK_P], dtype=tl.float32)
            for p0 in range(0, num_programs, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                # .cg: read through L2, where the other programs' partials are visible.
                total += tl.load(partial_ptr + p, mask=p < num_programs, other=0.0, cache_modifier=".cg")
            loss = tl.sum(total, axis=0) * out_scale
            tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
            if COLSUMS:
                _sum_partial_pairs(colsum_partial_ptr, colsum_ptr, num_programs, K, BLOCK_K)
            tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (and for CUDA-graph replays)


@triton.jit
def _masked_mse_bwd_kernel(
    grad_ptr,  # ∂L/∂loss: [] (mean/sum) or [B, K] any strides (none)
    x_ptr,  # [B, D] features, any strides
    r_ptr,  # [B, K] target, any strides
    inv_ptr_ptr,  # [D+1] int32 CSR pointers: kept columns reading column d are inv_k[inv_ptr[d]:inv_ptr[d+1]]
    inv_k_ptr,  # [K] int32
    shift_ptr,  # [K] fp32: μ (NORM 1), or the batch moments' shift c (NORM 2)
    center_ptr,  # [K] fp32: m, the batch mean around c (NORM 2)
    scale_ptr,  # [K] fp32: 1/σ, or 1/σ' (NORM >= 1)
    w_ptr,  # [K] fp32: 1/(N − 1), or 0 where σ' = 1 (NORM 2; reference.py states the batch math)
    inv_n_ptr,  # [K] fp32: 1/N (NORM 2)
    sums_ptr,  # NORM 2: [2, K] fp32 column sums: (A1, A2) of the forward, or (S1, S2) when SUMS_FINAL
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
    NORM: tl.constexpr,  # 0 none, 1 stats, 2 batch
    NAN_TO_NUM: tl.constexpr,
    REDUCTION: tl.constexpr,
    SUMS_FINAL: tl.constexpr,  # NORM 2: sums are S1, S2 already (else A1, A2, scaled here by g)
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_ok = rows < B
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] feature columns
    d_ok = dcols < D
    # Built by build_column_map, so 0 <= start <= start + count <= K; clamped anyway, so that a corrupted map
    # (e.g. uninitialized buffers after module.to_empty) cannot make the kernel read outside inv_k.
    start = tl.minimum(tl.maximum(tl.load(inv_ptr_ptr + dcols, mask=d_ok, other=0), 0), K)
    stop = tl.minimum(tl.maximum(tl.load(inv_ptr_ptr + dcols + 1, mask=d_ok, other=0), start), K)
    count = stop - start  # kept columns reading d
    # x is read only where some kept column reads it.
    x_ok = row_ok[:, None] & (count > 0)[None, :]
    xv = tl.load(x_ptr + rows[:, None] * stride_xb + dcols.to(tl.int64)[None, :] * stride_xd, mask=x_ok, other=0.0)
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
        has = has & (k >= 0) & (k < K)
        ok = row_ok[:, None] & has[None, :]
        rv = tl.load(r_ptr + rows[:, None] * stride_rb + k[None, :] * stride_rk, mask=ok, other=0.0)
        z = xv
        if NORM >= 1:
            mu = tl.load(shift_ptr + k, mask=has, other=0.0)
            inv_sigma = tl.load(scale_ptr + k, mask=has, other=1.0)
        if NORM == 1:
            z = (xv - mu[None, :]) * inv_sigma[None, :]
        if NORM == 2:
            center = tl.load(center_ptr + k, mask=has, other=0.0)
            z = ((xv - mu[None, :]) - center[None, :]) * inv_sigma[None, :]
            z_ok = tl.abs(z) <= _FLT_MAX
            z = tl.where(z_ok, z, 0.0)
        if REDUCTION == 0:
            gk = tl.load(grad_ptr + rows[:, None] * stride_gb + k[None, :] * stride_gk, mask=ok, other=0.0)
            gk = gk.to(tl.float32) * grad_scale
        else:
            gk = g
        diff = z - rv.to(tl.float32)
        tl.store(grad_r_ptr + rows[:, None] * K + k[None, :], (-diff * gk).to(grad_r_ptr.dtype.element_ty), mask=ok)
        if NORM == 0:
            dx = diff * gk
        elif NORM == 1:
            dx = diff * gk * inv_sigma[None, :]
        else:
            # Batch norm's backward: (1/σ')·(dz − S1/N − z·S2·w), with S1 = Σ dz, S2 = Σ dz·z over the batch.
            dz = tl.where(z_ok, diff * gk, 0.0)
            w = tl.load(w_ptr + k, mask=has, other=0.0)
            inv_n = tl.load(inv_n_ptr + k, mask=has, other=0.0)
            s1 = tl.load(sums_ptr + k, mask=has, other=0.0)
            s2 = tl.load(sums_ptr + K + k, mask=has, other=0.0)
            if not SUMS_FINAL:
                s1 = s1 * g
                s2 = s2 * g
            dx = (dz - (s1 * inv_n)[None, :] - z * (s2 * w)[None, :]) * inv_sigma[None, :]
        acc += tl.where(ok, dx, 0.0)
    if NAN_TO_NUM:
        acc = tl.where(finite, acc, 0.0)
    out_ok = row_ok[:, None] & d_ok[None, :]
    tl.store(grad_x_ptr + rows[:, None] * D + dcols[None, :], acc.to(grad_x_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------- launchers

@dataclass
class Tuning:
    """Launch shapes of every kernel; bench/tune_kernels.py times the alternatives on a GPU."""

    walk_tile: int = 2048  # elements of a program's tile in the walks over the K kept columns (forward, moments)
    backward_tile: int = 1024  # elements of a backward program's tile ([rows, D columns])
    elements_per_warp: int = 128  # a warp per 128 tile elements (4 a thread), up to max_warps
    max_warps: int = 8
    programs_per_sm: int = 4  # persistent grid of the walks: enough to hide latency, few partials to merge


TUNING = Tuning()
_MAX_BLOCK_COLS = 256
_BLOCK_P = 1024
_scratch_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def scratch(t: torch.Tensor, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counter [1] int32, partials [≥ programs] fp32) of a last-program reduction on t's device.

    The counter is zero between launches (the last program resets it). Both are kept rather than
    allocated per call — a launch needs no memset and no allocation — one pair per (device, stream), so
    launches on two streams never share one, and per thread for CPU tensors (the interpreter). While a CUDA
    graph is being captured, each launch gets its own pair, the counter zeroed by a memset captured into the
    graph: graphs replayed concurrently then share nothing, and no cached tensor lives in (or is recycled
    from) a graph's private memory pool. A launch that raises drops its pair (scratch_guard).
    """
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return _new_scratch(t, programs)
    key = _scratch_key(t)
    pair = _scratch_cache.get(key)
    if pair is None or pair[1].shape[0] < programs:
        pair = _scratch_cache[key] = _new_scratch(t, max(programs, max_programs(t)))
    return pair


def _scratch_key(t: torch.Tensor) -> tuple:
    return (t.device, current_stream_handle(t.device.index) if t.is_cuda else threading.get_ident())


@contextlib.contextmanager
def scratch_guard(t: torch.Tensor):
    """Around a launch that uses scratch(t): if it raises, the cached pair is dropped, since a launch that
    failed part-way (programs ran, the last one did not) can leave the counter non-zero, and every later
    reduction would then skip its final sum. The next launch gets a fresh, zeroed pair."""
    try:
        yield
    except BaseException:
        _scratch_cache.pop(_scratch_key(t), None)
        raise


def _new_scratch(t: torch.Tensor, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(1, dtype=torch.int32, device=t.device),
            torch.empty(programs, dtype=torch.float32, device=t.device))


def block_sizes(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for a [rows, cols] walk: cols up to 256 wide, about `tile` elements a tile."""
    block_cols = min(next_power_of_2(cols), _MAX_BLOCK_COLS)
    block_rows = max(1, min(tile // block_cols, next_power_of_2(rows)))
    return block_rows, block_cols


def num_warps_for(block_rows: int, block_cols: int) -> int:
    """A warp per TUNING.elements_per_warp tile elements, 1 to TUNING.max_warps: no idle threads on the tiny
    tiles of small shapes, and no register spills at sm_80/sm_90 (tests/aot_check.py)."""
    return max(1, min(TUNING.max_warps, block_rows * block_cols // TUNING.elements_per_warp))


def max_programs(t: torch.Tensor) -> int:
    """Programs of a persistent grid: TUNING.programs_per_sm per SM on CUDA."""
    if not t.is_cuda:
        return 8  # the interpreter runs programs one after another: fewer is faster
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return TUNING.programs_per_sm * count


_sm_counts: dict[int, int] = {}


def launch_forward(
    x: torch.Tensor,  # [B, D], B >= 1
    target: torch.Tensor,  # [B, K]
    index: torch.Tensor,  # [K] int64, values in [0, D)
    shift,  # [K] fp32 μ, or None (norm "none")
    scale,  # [K] fp32 1/σ, or None
    norm: int,  # 0 none, 1 stats, 2 batch
    nan_to_num: bool,
    reduction: int,  # 0 none, 1 mean, 2 sum
    colsums: bool = False,  # also return the [2, K] column sums of the batch-norm backward
    center=None,  # norm "batch": [K] fp32 m, the batch mean around the shift passed as `shift`
):
    """(loss [] or [B, K] in x.dtype, colsums [2, K] fp32 or None); inputs validated by the caller."""
    B, D = x.shape
    K = index.shape[0]
    block_b, block_k = block_sizes(B, K, TUNING.walk_tile)
    grid = (min(cdiv(B, block_b), max_programs(x)),)
    if shift is None:
        shift = scale = x  # never read: NORM == 0
    if center is None:
        center = shift  # never read: NORM < 2
    with device_guard(x), scratch_guard(x):
        if reduction == 0:
            out = torch.empty((B, K), dtype=x.dtype, device=x.device)
            partial = counter = out  # unused
        else:
            out = torch.empty((), dtype=x.dtype, device=x.device)
            counter, partial = scratch(x, grid[0])
        if colsums:
            sums = torch.empty((2, K), dtype=torch.float32, device=x.device)
            sums_partial = torch.empty((grid[0], 2, K), dtype=torch.float32, device=x.device)
        else:
            sums = sums_partial = partial  # unused
        _FWD[grid](
            x, target, index, shift, center, scale, out, partial, sums_partial, sums, counter,
            B, K, D,
            x.stride(0), x.stride(1), target.stride(0), target.stride(1),
            1.0 / (B * K) if reduction == 1 else 1.0,
            NORM=norm, NAN_TO_NUM=int(nan_to_num), REDUCTION=reduction, COLSUMS=int(colsums),
            BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_P=_BLOCK_P, num_warps=num_warps_for(block_b, block_k),
        )  # fmt: skip
    return out, (sums if colsums else None)


def launch_backward(
    grad_loss: torch.Tensor,  # [] or [B, K]
    x: torch.Tensor,  # [B, D], B >= 1
    target: torch.Tensor,  # [B, K]
    inv_ptr: torch.Tensor,  # [D+1] int32
    inv_k: torch.Tensor,  # [K] int32
    stats,  # tuple of [K] fp32 views: () none, (μ, 1/σ) stats, (c, m, 1/σ', w, 1/N) batch
    nan_to_num: bool,
    reduction: int,
    sums=None,  # batch: [2, K] fp32, (A1, A2) of the forward or, with sums_final, (S1, S2)
    sums_final: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [B, D] in x.dtype, grad_target [B, K] in target.dtype), both freshly allocated."""
    B, D = x.shape
    K = inv_k.shape[0]
    block_b, block_d = block_sizes(B, D, TUNING.backward_tile)
    grid = (cdiv(B, block_b), cdiv(D, block_d))
    norm = {0: 0, 2: 1, 5: 2}[len(stats)]
    if norm == 2:
        shift, center, scale, w, inv_n = stats
    else:
        shift, scale = stats if stats else (x, x)  # unused slots: any pointer, never read
        center = w = inv_n = x
    sums = x if sums is None else sums
    g_strides = (grad_loss.stride(0), grad_loss.stride(1)) if reduction == 0 else (0, 0)
    with device_guard(x):
        grad_x = torch.empty((B, D), dtype=x.dtype, device=x.device)
        grad_target = torch.empty((B, K), dtype=target.dtype, device=x.device)
        _BWD[grid](
            grad_loss, x, target, inv_ptr, inv_k, shift, center, scale, w, inv_n, sums, grad_x, grad_target,
            B, K, D,
            x.stride(0), x.stride(1), target.stride(0), target.stride(1), *g_strides,
            2.0 / (B * K) if reduction == 1 else 2.0,
            NORM=norm, NAN_TO_NUM=int(nan_to_num), REDUCTION=reduction, SUMS_FINAL=int(sums_final),
            BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps_for(block_b, block_d),
        )  # fmt: skip
    return grad_x, grad_target


_FWD = KernelLauncher(_masked_mse_fwd_kernel)
_BWD = KernelLauncher(_masked_mse_bwd_kernel)


def masked_mse_forward(x, target, index, shift, scale, nan_to_num: bool, reduction: int) -> torch.Tensor:
    """norm "none" (shift = scale = None) or "stats": the loss ([] or [B, K] in x.dtype)."""
    loss, _ = launch_forward(x, target, index, shift, scale, 0 if shift is None else 1, nan_to_num, reduction)
    return loss


def masked_mse_backward(grad_loss, x, target, inv_ptr, inv_k, shift, scale, nan_to_num: bool, reduction: int):
    """norm "none" / "stats": (grad_x [B, D], grad_target [B, K])."""
    stats = () if shift is None else (shift, scale)
    return launch_backward(grad_loss, x, target, inv_ptr, inv_k, stats, nan_to_num, reduction)
