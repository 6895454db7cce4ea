"""Launching the kernels with as little host work as possible.

At the batch size of the motivating training run (B = 4) a step of the loss is host overhead, not
arithmetic: the kernels run for a few µs, while `kernel[grid](...)` spends tens of µs in Triton's Python
(binding and specializing every argument, hashing the cache key, building launch metadata) before the
driver call, on every launch. KernelLauncher pays that once per specialization: the first launch goes
through Triton, which compiles and returns the compiled kernel, and later launches with the same
specialization call its launcher directly — the same call `JITFunction.run` makes, with the same
arguments.

The cache key holds more than Triton specializes on (tensor dtypes and 16-byte alignment of data pointers;
the scalar arguments' values, of which Triton looks at an integer's width, whether it is 1 and whether 16
divides it), so a cached kernel is only reused where Triton would pick the same one. The direct path is
used only for CUDA tensors, with Triton versions that have the launcher interface it relies on
(`triton.knobs`, `CompiledKernel.packed_metadata`), and only while no launch hooks are registered
(profilers add them; they then get Triton's own path). FUSEDVQ_TRITON_DIRECT_LAUNCH=0 turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch
import triton

from .plan import REDUCTION_COLUMN, REDUCTION_MEAN

_NO_GUARD = contextlib.nullcontext()
# Triton's interpreter patches module-level state while it runs a kernel: launches on CPU tensors from
# several threads would corrupt each other (they run programs one by one anyway, so nothing is lost).
_INTERPRETER_LOCK = threading.Lock()
_MAX_CACHED = 1024


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ in plain Python (triton.cdiv is a constexpr function whose host-side call costs µs)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current for a launch; no context switch when it already is."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


def _direct_launch_supported() -> bool:
    if os.environ.get("FUSEDVQ_TRITON_DIRECT_LAUNCH", "1") == "0":
        return False
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime is not None and hasattr(runtime, "launch_enter_hook")


def _hooked() -> bool:
    """Launch hooks registered (a profiler's): launches must go through Triton, which calls them."""
    runtime = triton.knobs.runtime
    return any(getattr(hook, "calls", hook is not None) for hook in (runtime.launch_enter_hook,
                                                                      runtime.launch_exit_hook))


def _specialization(args: tuple, num_tensors: int) -> tuple:
    """A key that decides which compiled kernel Triton launches for these runtime arguments: the leading
    tensors' dtypes and whether their data pointers are 16-byte aligned, and the scalars themselves (Triton
    looks only at an integer's width, whether it is 1 and whether 16 divides it: the values say all that)."""
    return tuple([(t.dtype, t.data_ptr() & 15 == 0) for t in args[:num_tensors]]), args[num_tensors:]


class KernelLauncher:
    """launcher[grid](*runtime_args, num_warps=..., **constexprs) for one @triton.jit kernel whose
    constexpr parameters follow its runtime ones and are all passed by keyword."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict[tuple, object] = {}
        self.num_tensors = 0  # leading tensor arguments: the kernels take their tensors first
        params = getattr(fn, "params", None)  # None under TRITON_INTERPRET: an InterpretedFunction
        self.direct = params is not None and _direct_launch_supported()
        if self.direct:
            self.num_runtime = sum(not p.is_constexpr for p in params)
            self.constexpr_names = tuple(p.name for p in params if p.is_constexpr)
            assert not any(p.is_constexpr for p in params[: self.num_runtime]), "constexprs must come last"

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, **kwargs)

    def launch(self, grid: tuple, args: tuple, num_warps: int, **constexprs) -> None:
        first = args[0]
        if not first.is_cuda:  # TRITON_INTERPRET: its state is global, so one launch at a time
            with _INTERPRETER_LOCK:
                self.fn[grid](*args, num_warps=num_warps, **constexprs)
            return
        if not self.direct:
            self.fn[grid](*args, num_warps=num_warps, **constexprs)
            return
        assert len(args) == self.num_runtime and len(constexprs) == len(self.constexpr_names)
        constants = tuple(constexprs[name] for name in self.constexpr_names)
        if not self.num_tensors:
            self.num_tensors = next(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
        key = (first.device.index, num_warps, constants, _specialization(args, self.num_tensors))
        compiled = self.compiled.get(key)
        if compiled is None or _hooked():
            compiled = self.fn[grid](*args, num_warps=num_warps, **constexprs)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            if hasattr(compiled, "packed_metadata") and hasattr(compiled, "function"):
                if len(self.compiled) >= _MAX_CACHED:  # every new batch size adds a key: keep it bounded
                    self.compiled.clear()
                self.compiled[key] = compiled
            return
        grid = tuple(grid) + (1,) * (3 - len(grid))
        stream = current_stream_handle(first.device.index)
        # What JITFunction.run passes, with no launch metadata and no hooks (none are registered).
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                     None, *args, *constants)


def current_stream_handle(index: int) -> int:
    """The raw handle of the device's current stream (what Triton's CUDA driver passes)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


# ---------------------------------------------------------------------------------------------------
# Launch shapes and scratch memory
# ---------------------------------------------------------------------------------------------------

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


def reduction_scale(reduction: int, B: int, K: int) -> float:
    """What the reduction multiplies the sum of its terms by: 1/(B·K) for mean, 1/B for column (a column's
    sum over the batch), 1 for sum and none; the gradient's factor is twice it. B = 0 (a rank without rows)
    counts as 1. (Here, with the launch helpers every launcher runs; fusedvq/cpu/stats.py keeps a copy so
    that an eager CPU call runs no kernels/ file for it.)"""
    if reduction == REDUCTION_MEAN:
        return 1.0 / max(B * K, 1)
    return 1.0 / max(B, 1) if reduction == REDUCTION_COLUMN else 1.0
