"""The host's side of a launch, with no triton import at the top (fusedvq's host code imports this module on
CPU-only installs too): what the host hands the kernels besides tensors — the mode codes (the kernels compare
their NORM and REDUCTION constexprs with them; the host's op schemas carry them as integers), the Mode
record of one launch, the column map every backend reads, the scale of a reduction — and KernelLauncher,
which launches a compiled kernel with as little host work as possible. (The launch shapes and the scratch
memory of the last-program reductions are tiles.py's, beside the tile pieces they size.)

The column map: which of the D feature columns each of the K kept columns reads, and the inverse.

    index    [K]   int64  index[k] = d, the feature column that kept column k reads (duplicates allowed)
    inv_ptr  [D+1] int32  CSR pointers over the D feature columns: the kept columns reading column d are
                          inv_k[inv_ptr[d] : inv_ptr[d+1]]
    inv_k    [K]   int32  the k's sorted by the column they read (stable: ascending k within a column)

The backward kernels write grad_x as a gather over the D output columns through (inv_ptr, inv_k), so
duplicate indices accumulate without atomics and every grad_x element is written exactly once. fusedvq
builds it (arguments.build_column_map) with device-side torch ops only (no host synchronization).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import NamedTuple

import torch

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM, REDUCTION_COLUMN = 0, 1, 2, 3  # ([B, K], Σ/(B·K), Σ, Σ_b/B [K])
NORM_NONE, NORM_STATS, NORM_BATCH = 0, 1, 2  # (x̃, (x̃ − μ)/σ, the batch's own μ, σ)


class Gap(NamedTuple):
    """The target's gap: a hybrid decoder's `width` embedding columns, from column `at` on, that the feature
    columns' loss skips (the target is [B, K + width]; kept column k is its column k + width·[k >= at]). The
    public argument is target_gap=(at, width); the op schemas and kernels take gap_at and gap_width."""

    at: int = 0
    width: int = 0


NO_GAP = Gap(0, 0)


class Mode(NamedTuple):
    """What a launch computes: the norm and reduction codes, nan_to_num, the target's Gap (skipped unless a
    hybrid's embeddings are compared there), which gradients are wanted (grad_x, grad_target), and whether it
    is clean_features (z itself, no target)."""

    norm: int = NORM_NONE
    nan_to_num: bool = False
    reduction: int = REDUCTION_MEAN
    gap: Gap = NO_GAP
    needs: tuple = (True, True)
    clean: bool = False


class ColumnMap(NamedTuple):
    index: torch.Tensor  # [K] int64
    inv_ptr: torch.Tensor  # [D+1] int32
    inv_k: torch.Tensor  # [K] int32


# The accumulation dtype of every backend, by input dtype: float64 stays float64 (the PyTorch paths), the
# others compute in float32. (A lookup rather than a function: the hot path of a small batch counts calls.)
COMPUTE_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
                 torch.bfloat16: torch.float32}


def reduction_scale(reduction: int, B: int, K: int) -> float:
    """What the reduction multiplies the sum of its terms by: 1/(B·K) for mean, 1/B for column (a column's
    sum over the batch), 1 for sum and none; the gradient's factor is twice it. B = 0 (a rank without rows)
    counts as 1. Every launcher and the CPU path's reductions (fusedvq/cpu/blocked.py) read it."""
    if reduction == REDUCTION_MEAN:
        return 1.0 / max(B * K, 1)
    return 1.0 / max(B, 1) if reduction == REDUCTION_COLUMN else 1.0


# ---------------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------------

_NO_GUARD = contextlib.nullcontext()
# Triton's interpreter patches module-level state while it runs a kernel: launches on CPU tensors from
# several threads would corrupt each other (they run programs one by one anyway, so nothing is lost).
_INTERPRETER_LOCK = threading.Lock()
_MAX_CACHED = 1024


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current for a launch; no context switch when it already is."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


def _direct_launch_supported() -> bool:
    if os.environ.get("FUSEDVQ_TRITON_DIRECT_LAUNCH", "1") == "0":
        return False
    import triton  # (here: the CPU path imports this module, and never makes a KernelLauncher)

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime is not None and hasattr(runtime, "launch_enter_hook")


def _hooked() -> bool:
    """Launch hooks registered (a profiler's): launches must go through Triton, which calls them."""
    import triton

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
    constexpr parameters follow its runtime ones and are all passed by keyword.

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
