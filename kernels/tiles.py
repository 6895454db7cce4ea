"""The pieces every kernel shares, on both sides. On the device, @triton.jit helpers inlined where they are
called: the codes of plan.py as constexprs, the finite test, the walk over kept columns, the normalization of
a row tile, the per-program partial sums of a last-program reduction. On the host, what sizes and feeds
them: the launch shapes (TUNING, block sizes, warps, programs) and the scratch memory of the last-program
reductions (a ticket counter and the partials).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import NORM_BATCH, NORM_NONE, NORM_STATS, REDUCTION_COLUMN, REDUCTION_NONE, current_stream_handle

# The codes of plan.py as constexprs, which the kernels compare their NORM / REDUCTION arguments with.
NORM_NONE_C = tl.constexpr(NORM_NONE)
NORM_STATS_C = tl.constexpr(NORM_STATS)
NORM_BATCH_C = tl.constexpr(NORM_BATCH)
REDUCTION_NONE_C = tl.constexpr(REDUCTION_NONE)
REDUCTION_COLUMN_C = tl.constexpr(REDUCTION_COLUMN)


FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |v| <= FLT_MAX  ⇔  v is finite (false for NaN and ±Inf)


@triton.jit
def kept_columns(idx_ptr, k0, K, D, BLOCK_K: tl.constexpr):
    """Kept columns k0 .. k0 + BLOCK_K: (ids [BLOCK_K], their feature columns d, in-range mask)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    d = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    col_ok = col_ok & (d >= 0) & (d < D)  # validated before launch; never read out of bounds
    return cols, d, col_ok


@triton.jit
def store_partial_pair(partial_ptr, pid, cols, col_ok, K, a, b):
    """Program pid's column sums a, b [BLOCK_B, BLOCK_K] → partial[pid, 0 | 1, cols] ([P, 2, K] fp32)."""
    base = partial_ptr + pid.to(tl.int64) * 2 * K + cols
    tl.store(base, tl.sum(a, axis=0), mask=col_ok)
    tl.store(base + K, tl.sum(b, axis=0), mask=col_ok)


@triton.jit
def sum_partial_pairs(partial_ptr, out_ptr, num_programs, K, BLOCK_K: tl.constexpr):
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
def write_reduction(partial_ptr, column_partial_ptr, w_ptr, out_ptr, num_programs, K, out_scale,
                    REDUCTION: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """The last program's part of a loss reduction: out = out_scale·Σ_p partial[p] (mean, sum), or the K
    column errors of reduction "column" (sum_partial_columns), adding in program order (deterministic)."""
    if REDUCTION == REDUCTION_COLUMN_C:
        sum_partial_columns(column_partial_ptr, w_ptr, out_ptr, num_programs, K, out_scale, WEIGHTED, BLOCK_K)
    else:
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, num_programs, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            # .cg: read through L2, where the other programs' partials are visible.
            total += tl.load(partial_ptr + p, mask=p < num_programs, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr, (tl.sum(total, axis=0) * out_scale).to(out_ptr.dtype.element_ty))


@triton.jit
def sum_partial_columns(partial_ptr, w_ptr, out_ptr, num_programs, K, out_scale, WEIGHTED: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """out [K] = out_scale·w·Σ_p partial[p] in program order (deterministic), cast to out's dtype; run by the
    last program only (partial: [P, K] fp32)."""
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        total = tl.zeros([BLOCK_K], dtype=tl.float32)
        for p in range(0, num_programs):
            total += tl.load(partial_ptr + p * K + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
        total = total * out_scale
        if WEIGHTED:
            total = total * tl.load(w_ptr + cols, mask=col_ok, other=0.0)
        tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def load_features(x_ptr, rows, d, ok, stride_xb, stride_xd, NAN_TO_NUM: tl.constexpr):
    """x̃ of a [rows, d] tile in fp32 (0 where masked off; nan_to_num'd when NAN_TO_NUM)."""
    xv = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
    if NAN_TO_NUM:
        xv = tl.where(tl.abs(xv) <= FLT_MAX, xv, 0.0)
    return xv


@triton.jit
def column_affine(shift_ptr, center_ptr, scale_ptr, cols, col_ok, NORM: tl.constexpr):
    """(μ or c, m, 1/σ) of the columns `cols` for NORM; zeros (never used) where NORM does not read them."""
    mu = tl.zeros(cols.shape, dtype=tl.float32)
    center = tl.zeros(cols.shape, dtype=tl.float32)
    inv_sigma = tl.zeros(cols.shape, dtype=tl.float32)
    if NORM != NORM_NONE_C:
        mu = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        inv_sigma = tl.load(scale_ptr + cols, mask=col_ok, other=1.0)
    if NORM == NORM_BATCH_C:
        center = tl.load(center_ptr + cols, mask=col_ok, other=0.0)
    return mu, center, inv_sigma


@triton.jit
def normalize(xv, mu, center, inv_sigma, NORM: tl.constexpr):
    """(z, z_ok) of a tile: stats (x̃ − μ)·(1/σ); batch ((x̃ − c) − m)·(1/σ') then nan_to_num, z_ok marking
    the finite z; none z = x̃. μ, c, m, 1/σ are [cols] vectors (unused ones may be anything)."""
    z = xv
    if NORM == NORM_STATS_C:
        z = (xv - mu[None, :]) * inv_sigma[None, :]
    z_ok = tl.abs(z) <= FLT_MAX
    if NORM == NORM_BATCH_C:
        z = ((xv - mu[None, :]) - center[None, :]) * inv_sigma[None, :]
        z_ok = tl.abs(z) <= FLT_MAX
        z = tl.where(z_ok, z, 0.0)
    return z, z_ok


@triton.jit
def add_terms(diff, wk, acc, squares, out_ptr, rows, ocols, ok, width, REDUCTION: tl.constexpr,
              WEIGHTED: tl.constexpr):
    """The loss terms of a tile diff = z − r (0 where masked off) whose output columns are ocols of `width`:
    squares += diff² (column: weighted once per column, at the end), else e = w·diff², stored (none) or
    added into acc. Returns (acc, squares)."""
    if REDUCTION == REDUCTION_COLUMN_C:
        squares += diff * diff
    else:
        e = diff * diff
        if WEIGHTED:
            e = e * wk[None, :]
        if REDUCTION == REDUCTION_NONE_C:
            tl.store(out_ptr + rows[:, None] * width + ocols[None, :], e.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            acc += e
    return acc, squares


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (counts are scalars, either may be 0). The cross term is
    added only when both have rows, so a huge mean never meets a zero count (no inf·0 = NaN)."""
    n = n_a + n_b
    both = (n_a > 0) & (n_b > 0)
    frac = n_b / tl.maximum(n, 1.0)
    delta = tl.where(both, mean_b - mean_a, 0.0)
    mean = tl.where(n_a > 0, mean_a + delta * frac, mean_b)
    m2 = m2_a + m2_b + tl.where(both, delta * delta * (n_a * frac), 0.0)
    return n, mean, m2


# ---------------------------------------------------------------------------------------------------
# The host's side: launch shapes and scratch memory
# ---------------------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ in plain Python (triton.cdiv is a constexpr function whose host-side call costs µs)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


@dataclass
class Tuning:
    """Launch shapes of every kernel; bench/tune_kernels.py times the alternatives on a GPU."""

    walk_tile: int = 2048  # elements of a program's tile in the walks over the K kept columns (forward, moments)
    backward_tile: int = 1024  # elements of a backward program's tile ([rows, D columns])
    elements_per_warp: int = 128  # a warp per 128 tile elements (4 a thread), up to max_warps
    max_warps: int = 8
    programs_per_sm: int = 4  # persistent grid of the walks: enough to hide latency, few partials to merge
    # The loss forward of norm "none" / "stats": "gather" (masked_mse.py: the kept columns gathered from
    # global memory) or the candidate "rows" (row_loads.py: whole rows in 128-bit loads, gathered in the SM),
    # with rows_per_chunk rows a chunk (rounded up to 16 bytes' worth of rows). FUSEDVQ_FORWARD_LOADS sets it.
    forward_loads: str = "gather"
    rows_per_chunk: int = 8


FORWARD_LOADS = ("gather", "rows")


def _tuning_from_environment() -> Tuning:
    loads = os.environ.get("FUSEDVQ_FORWARD_LOADS", "gather")
    if loads not in FORWARD_LOADS:
        raise ValueError(f"FUSEDVQ_FORWARD_LOADS={loads!r}: expected one of {', '.join(FORWARD_LOADS)}")
    return Tuning(forward_loads=loads)


TUNING = _tuning_from_environment()
_MAX_BLOCK_COLS = 256
BLOCK_P = 1024  # partial sums the last program adds at a time
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


class scratch_guard:
    """`with scratch_guard(t):` around a launch that uses scratch(t): if it raises, the cached pair is
    dropped, since a launch that failed part-way (programs ran, the last one did not) can leave the counter
    non-zero, and every later reduction would then skip its final sum. The next launch gets a fresh, zeroed
    pair. (A plain class: on the B = 4 host path a generator-based context manager costs µs.)"""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            _scratch_cache.pop(_scratch_key(self.t), None)
        return False


def _new_scratch(t: torch.Tensor, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(1, dtype=torch.int32, device=t.device),
            torch.empty(programs, dtype=torch.float32, device=t.device))


def block_sizes(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for a [rows, cols] walk: cols up to 256 wide, about `tile` elements a tile."""
    block_cols = min(next_power_of_2(cols), _MAX_BLOCK_COLS)
    block_rows = max(1, min(tile // block_cols, next_power_of_2(rows)))
    return block_rows, block_cols


def walk_grid(t: torch.Tensor, rows: int, cols: int) -> tuple[int, int, tuple[int]]:
    """(BLOCK_ROWS, BLOCK_COLS, grid) of a persistent walk over [rows, cols] of t's kernels (the forward, the
    batch's moments and dz sums): tiles of about TUNING.walk_tile elements, at most max_programs(t) programs."""
    block_rows, block_cols = block_sizes(rows, cols, TUNING.walk_tile)
    return block_rows, block_cols, (min(cdiv(rows, block_rows), max_programs(t)),)


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
