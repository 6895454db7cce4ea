"""Launch settings shared by every kernel: the mode codes, the launch shapes (TUNING, chosen by timing the
alternatives on a GPU with bench/tune_kernels.py; no autotuning at run time) and the scratch memory of the
last-program reductions."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import triton.language as tl

# The host-side codes are re-exported for the launchers, beside their constexpr twins below.
from ..contract import NORM_BATCH, NORM_NONE, NORM_STATS, REDUCTION_MEAN, REDUCTION_NONE  # noqa: F401
from .launch import current_stream_handle, next_power_of_2

# The codes of fusedvq.contract, as constexprs the kernels compare their NORM / REDUCTION arguments with.
NORM_NONE_C = tl.constexpr(NORM_NONE)
NORM_STATS_C = tl.constexpr(NORM_STATS)
NORM_BATCH_C = tl.constexpr(NORM_BATCH)
REDUCTION_NONE_C = tl.constexpr(REDUCTION_NONE)


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


