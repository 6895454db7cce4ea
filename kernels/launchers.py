"""KernelLauncher, which launches every kernel of this package with as little host work as possible; the
launches of masked_mse.py's two kernels, which every norm builds on (batch_norm.py wraps norm="batch" around
them), and the entry points of norm "none" / "stats" (the loss and clean_features).

    launch_forward   grid (min(cdiv(B, BLOCK_B), programs),): the loss (a scalar, [K] or [B, K]), or z (clean)
    launch_backward  grid (cdiv(B, BLOCK_B), cdiv(D, BLOCK_D)): grad_x (and grad_r for the loss)
Inputs are validated by the caller; every launch runs under the tensors' device and never synchronizes.
affine: () for norm "none", (μ, 1/σ) for "stats", (c, m, 1/σ') forward / (c, m, 1/σ', 1/(N − 1), 1/N)
backward for "batch", each [K] fp32. mode: plan.Mode.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from .masked_mse import _masked_mse_bwd_kernel, _masked_mse_fwd_kernel
from . import plan
from .plan import NORM_BATCH, NORM_NONE, NORM_STATS, REDUCTION_COLUMN, REDUCTION_NONE, Mode, reduction_scale
from .tiles import BLOCK_P, TUNING, block_sizes, cdiv, num_warps_for, scratch, scratch_guard, walk_grid


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
        stream = plan.current_stream_handle(first.device.index)
        # What JITFunction.run passes, with no launch metadata and no hooks (none are registered).
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                     None, *args, *constants)



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
            gap.at, gap.width, reduction_scale(reduction, B, W) if reduction != REDUCTION_NONE else 1.0,  # (unread)
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
    with embeddings [B, c]), by gathered loads (the whole-row candidate, row_loads.py, is chosen by the op:
    fusedvq/ops/loss.py)."""
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
