"""torch.library registration of the fused loss: one forward op, one backward op, autograd between them.

    fusedvq::masked_mse_forward(x, target, index, inv_ptr, inv_k, shift?, scale?, nan_to_num, reduction,
                                use_triton) -> (loss, diff, finite)
    fusedvq::masked_mse_backward(grad, x, target, index, inv_ptr, inv_k, shift?, scale?, diff, finite,
                                 nan_to_num, reduction, use_triton) -> (grad_x, grad_target)

use_triton=True runs the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); they
recompute z in the backward, so diff and finite come back empty and nothing but the inputs is saved.
use_triton=False runs cpu.py, which saves diff [B, K] (and the finite mask with nan_to_num) to
avoid a second gather. Both ops are opaque to torch.compile (fake implementations give the shapes) and
contain no host synchronization, so a compiled or CUDA-graph-captured training step runs them as is.
Traced calls (torch.compile, torch.export) use the registered ops. Eager calls skip the ops' dispatch,
which costs more than a small loss (see "eager calls" below): norm="batch" through the ops' own
implementations and autograd (_EagerBatch); norm "none"/"stats" through _EagerKernels (Triton),
_EagerReference (CPU, large B: its backward writes grad_target over the forward's diff, 20% of a
B = 65536 step) or the plain composition (CPU, small B). A backward with create_graph=True, and torch.func
transforms, take the plain composition of reference.py, which autograd differentiates to any order.
Arguments are validated by the callers (functional.py, module.py) before they reach these ops.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import cpu, reference
from .columns import ColumnMap
from .contract import REDUCTION_NONE, compute_dtype


_kernels_module = None


def _kernels():
    """fusedvq.kernels, imported on first use (it imports triton: only the Triton path needs it)."""
    global _kernels_module
    if _kernels_module is None:
        from . import kernels

        _kernels_module = kernels
    return _kernels_module


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _empty_mask(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.bool)


def _loss_shape(x: Tensor, index: Tensor, reduction: int) -> tuple[int, ...]:
    return (x.shape[0], index.shape[0]) if reduction == REDUCTION_NONE else ()


def _masked_forward_impl(
    x: Tensor,
    target: Tensor,
    index: Tensor,
    inv_ptr: Tensor,
    inv_k: Tensor,
    shift: Optional[Tensor],
    scale: Optional[Tensor],
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # inv_ptr / inv_k (the ColumnMap's inverse) are not read here: they are inputs so autograd saves
    # them for the backward op, which writes grad_x as a gather through them.
    if use_triton:
        loss = _kernels().masked_mse_forward(x, target, index, shift, scale, nan_to_num, reduction)
        return loss, _empty(x), _empty_mask(x)
    loss, diff, finite = cpu.masked_mse_forward(x, target, index, shift, scale, nan_to_num, reduction)
    return loss, diff, finite if finite is not None else _empty_mask(x)


masked_mse_forward = torch.library.custom_op("fusedvq::masked_mse_forward", mutates_args=())(_masked_forward_impl)


@masked_mse_forward.register_fake
def _(x, target, index, inv_ptr, inv_k, shift, scale, nan_to_num, reduction, use_triton):
    loss = x.new_empty(_loss_shape(x, index, reduction))
    if use_triton:
        return loss, _empty(x), _empty_mask(x)
    diff = x.new_empty((x.shape[0], index.shape[0]), dtype=compute_dtype(x.dtype))
    finite = diff.new_empty(diff.shape if nan_to_num else (0,), dtype=torch.bool)
    return loss, diff, finite


def _masked_backward_impl(
    grad: Tensor,
    x: Tensor,
    target: Tensor,
    index: Tensor,
    inv_ptr: Tensor,
    inv_k: Tensor,
    shift: Optional[Tensor],
    scale: Optional[Tensor],
    diff: Tensor,
    finite: Tensor,
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    if use_triton:
        return _kernels().masked_mse_backward(
            grad, x, target, inv_ptr, inv_k, shift, scale, nan_to_num, reduction
        )
    return cpu.masked_mse_backward(
        grad, diff, finite if nan_to_num else None, index, scale, x.shape[1], reduction, x.dtype, target.dtype
    )


masked_mse_backward = torch.library.custom_op("fusedvq::masked_mse_backward", mutates_args=())(_masked_backward_impl)


@masked_mse_backward.register_fake
def _(grad, x, target, index, inv_ptr, inv_k, shift, scale, diff, finite, nan_to_num, reduction, use_triton):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        target, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    x, target, index, inv_ptr, inv_k, shift, scale, nan_to_num, reduction, use_triton = inputs
    _, diff, finite = output
    ctx.save_for_backward(x, target, index, inv_ptr, inv_k, shift, scale, diff, finite)
    ctx.options = (nan_to_num, reduction, use_triton)


def _backward(ctx, grad_loss, _grad_diff=None, _grad_finite=None, backward_fn=None):
    x, target, index, inv_ptr, inv_k, shift, scale, diff, finite = ctx.saved_tensors
    nan_to_num, reduction, use_triton = ctx.options
    grad_x, grad_target = (backward_fn or masked_mse_backward)(
        grad_loss, x, target, index, inv_ptr, inv_k, shift, scale, diff, finite, nan_to_num, reduction, use_triton
    )
    return grad_x, grad_target, None, None, None, None, None, None, None, None


torch.library.register_autograd("fusedvq::masked_mse_forward", _backward, setup_context=_setup_context)


def grads_with_graph(composed, x: Tensor, target: Tensor, grad_loss: Tensor, needs) -> tuple:
    """(grad_x, grad_target) for a backward run with create_graph=True: the composition's own autograd,
    so that the gradients are themselves differentiable (double backward, gradient penalties) and exact to
    any order; None where not needed. The fused backward computes them without a graph."""
    inputs = [t for t, need in zip((x, target), needs) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(composed(x, target), inputs, grad_loss, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def under_functorch() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running: the loss then takes the plain
    composition, which those transforms differentiate and batch like any torch code."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _refuse_synced_higher_order(group: str, what: str) -> None:
    if group:
        raise NotImplementedError(
            f'norm="batch" with sync_stats / process_group does not support {what}: the statistics come from '
            f"collectives over all ranks. Use sync_stats=False for this computation"
        )


class _EagerReference(torch.autograd.Function):
    """The reference path in eager mode, without the registered ops, whose dispatch costs more than the
    whole loss at small B. The forward's diff is kept on ctx, not saved, so that the backward may write
    grad_target over it; a second backward through the graph (retain_graph=True) computes it again."""

    @staticmethod
    def forward(ctx, x, target, index, shift, scale, nan_to_num, reduction):
        loss, diff, finite = cpu.masked_mse_forward(x, target, index, shift, scale, nan_to_num, reduction)
        ctx.save_for_backward(x, target, index, shift, scale)
        ctx.options = (nan_to_num, reduction)
        ctx.diff = (diff, finite)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, target, index, shift, scale = ctx.saved_tensors
        nan_to_num, reduction = ctx.options
        if torch.is_grad_enabled():  # create_graph=True
            ctx.diff = None
            composed = functools.partial(reference.masked_mse_composed, index=index, shift=shift, scale=scale,
                                         nan_to_num=nan_to_num, reduction=reduction)
            return (*grads_with_graph(composed, x, target, grad_loss, ctx.needs_input_grad[:2]),) + (None,) * 5
        kept, ctx.diff = ctx.diff, None
        if kept is None:  # spent by an earlier backward
            _, *kept = cpu.masked_mse_forward(x, target, index, shift, scale, nan_to_num, reduction)
        grad_x, grad_target = cpu.masked_mse_backward(
            grad_loss, *kept, index, scale, x.shape[1], reduction, x.dtype, target.dtype,
            needs=(ctx.needs_input_grad[0], ctx.needs_input_grad[1]), overwrite_diff=True,
        )
        return grad_x, grad_target, None, None, None, None, None


def masked_mse_op(
    x: Tensor,  # [B, D]
    target: Tensor,  # [B, K]
    columns: ColumnMap,
    shift: Optional[Tensor],  # [K] compute dtype, or None
    scale: Optional[Tensor],  # [K] compute dtype, or None
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
) -> Tensor:
    """The loss with autograd attached; arguments already canonical and valid. Traced (torch.compile,
    torch.export) it is the registered op; eager, the reference path calls reference.py directly: as a
    composition of torch ops for small batches (autograd's C++ backward has the least per-op overhead),
    else through _EagerReference."""
    if not torch.compiler.is_compiling():
        if under_functorch():
            return reference.masked_mse_composed(x, target, columns.index, shift, scale, nan_to_num, reduction)
        if use_triton:
            return _EagerKernels.apply(x, target, (columns, shift, scale, nan_to_num, reduction))
        if cpu.use_composed(x, columns.num_kept):
            return reference.masked_mse_composed(x, target, columns.index, shift, scale, nan_to_num, reduction)
        return _EagerReference.apply(x, target, columns.index, shift, scale, nan_to_num, reduction)
    loss, _, _ = masked_mse_forward(
        x, target, columns.index, columns.inv_ptr, columns.inv_k, shift, scale, nan_to_num, reduction, use_triton
    )
    return loss


# ------------------------------------------------------------------------------------ norm="batch"
#
#   fusedvq::batch_mse_forward(x, target, index, inv_ptr, inv_k, eps, nan_to_num, reduction, use_triton,
#                              group) -> (loss, stats [5, K], colsums [2, K], or [0, K] for reduction none)
#   fusedvq::batch_mse_backward(grad, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num,
#                               reduction, use_triton, group) -> (grad_x, grad_target)
# group: "" for this batch's own statistics, else a key from distributed.group_key (all ranks' rows).


def _merge_fn(group: str, eps: float):
    if not group:
        return None
    from . import distributed

    return distributed.merged_stats_fn(group, eps)


def _sum_fn(group: str):
    if not group:
        return None
    from . import distributed

    return distributed.sum_over_ranks_fn(group)


def _batch_forward_impl(
    x: Tensor,
    target: Tensor,
    index: Tensor,
    inv_ptr: Tensor,
    inv_k: Tensor,
    eps: float,
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
    group: str,
) -> tuple[Tensor, Tensor, Tensor]:
    merge = _merge_fn(group, eps)
    if use_triton:
        return _kernels().batch_mse_forward(x, target, index, eps, nan_to_num, reduction, merge)
    return cpu.batch_mse_forward(x, target, index, eps, nan_to_num, reduction, merge)


batch_mse_forward = torch.library.custom_op("fusedvq::batch_mse_forward", mutates_args=())(_batch_forward_impl)


@batch_mse_forward.register_fake
def _(x, target, index, inv_ptr, inv_k, eps, nan_to_num, reduction, use_triton, group):
    K = index.shape[0]
    cdt = torch.float32 if use_triton else compute_dtype(x.dtype)
    colsums = x.new_empty((0 if reduction == REDUCTION_NONE else 2, K), dtype=cdt)  # none: the backward sums
    return x.new_empty(_loss_shape(x, index, reduction)), x.new_empty((reference.NUM_STATS, K), dtype=cdt), colsums


def _batch_backward_impl(
    grad: Tensor,
    x: Tensor,
    target: Tensor,
    index: Tensor,
    inv_ptr: Tensor,
    inv_k: Tensor,
    stats: Tensor,
    colsums: Tensor,
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
    group: str,
) -> tuple[Tensor, Tensor]:
    total = _sum_fn(group)
    if use_triton:
        return _kernels().batch_mse_backward(
            grad, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num, reduction, total
        )
    return cpu.batch_mse_backward(grad, x, target, index, stats, colsums, nan_to_num, reduction, total)


batch_mse_backward = torch.library.custom_op("fusedvq::batch_mse_backward", mutates_args=())(_batch_backward_impl)


@batch_mse_backward.register_fake
def _(grad, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num, reduction, use_triton, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        target, memory_format=torch.contiguous_format
    )


def _batch_setup_context(ctx, inputs, output):
    x, target, index, inv_ptr, inv_k, eps, nan_to_num, reduction, use_triton, group = inputs
    _, stats, colsums = output
    ctx.save_for_backward(x, target, index, inv_ptr, inv_k, stats, colsums)
    ctx.options = (nan_to_num, reduction, use_triton, group)


def _batch_backward(ctx, grad_loss, _grad_stats=None, _grad_colsums=None, backward_fn=None):
    x, target, index, inv_ptr, inv_k, stats, colsums = ctx.saved_tensors
    nan_to_num, reduction, use_triton, group = ctx.options
    grad_x, grad_target = (backward_fn or batch_mse_backward)(
        grad_loss, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num, reduction, use_triton, group
    )
    return grad_x, grad_target, None, None, None, None, None, None, None, None


torch.library.register_autograd("fusedvq::batch_mse_forward", _batch_backward, setup_context=_batch_setup_context)


def batch_mse_op(
    x: Tensor,  # [B, D]
    target: Tensor,  # [B, K]
    columns: ColumnMap,
    eps: float,
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
    group: str = "",
) -> Tensor:
    """The batch-statistics loss with autograd attached; arguments already canonical and valid. Traced, it is
    the registered op; eager, the same implementations without the op's dispatch (_Eager)."""
    if not torch.compiler.is_compiling():
        if under_functorch():
            _refuse_synced_higher_order(group, "torch.func transforms")
            return reference.batch_mse_composed(x, target, columns.index, eps, nan_to_num, reduction)
        return _EagerBatch.apply(x, target, columns.index, columns.inv_ptr, columns.inv_k, eps, nan_to_num,
                            reduction, use_triton, group)
    loss, _, _ = batch_mse_forward(
        x, target, columns.index, columns.inv_ptr, columns.inv_k, eps, nan_to_num, reduction, use_triton, group
    )
    return loss


# ------------------------------------------------------------------------------------ eager calls
#
# A registered op's dispatch (schema parsing, the dispatcher, the generated autograd node) costs about
# 190 µs per forward+backward on a 2-core CPU: more than the whole loss of a small batch, and on a GPU host
# the difference between a fused step and an unfused one at B = 4. Eager calls therefore skip it; traced
# calls (torch.compile, torch.export) use the registered ops, which the tracer needs.


class _EagerKernels(torch.autograd.Function):
    """Eager Triton path of norm "none"/"stats": the two kernel launches and as little else as possible,
    since at small B the step is host work. Every tensor the backward reads goes through save_for_backward
    (saved-tensor hooks see them, and autograd checks that none was modified in place)."""

    @staticmethod
    def forward(ctx, x, target, rest):
        columns, shift, scale, nan_to_num, reduction = rest
        ctx.save_for_backward(x, target, columns.index, columns.inv_ptr, columns.inv_k, shift, scale)
        ctx.options = (nan_to_num, reduction)
        return _kernels().masked_mse_forward(x, target, columns.index, shift, scale, nan_to_num, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        x, target, index, inv_ptr, inv_k, shift, scale = ctx.saved_tensors
        nan_to_num, reduction = ctx.options
        if torch.is_grad_enabled():  # create_graph=True
            composed = functools.partial(reference.masked_mse_composed, index=index, shift=shift, scale=scale,
                                         nan_to_num=nan_to_num, reduction=reduction)
            return (*grads_with_graph(composed, x, target, grad_loss, ctx.needs_input_grad[:2]), None)
        grad_x, grad_target = _kernels().masked_mse_backward(
            grad_loss, x, target, inv_ptr, inv_k, shift, scale, nan_to_num, reduction
        )
        return grad_x, grad_target, None


class _EagerBatch(torch.autograd.Function):
    """Eager norm="batch": the registered op's own implementations, setup_context and backward (one
    definition of its autograd), without the op's dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _batch_forward_impl(*inputs)
        _batch_setup_context(ctx, inputs, output)
        ctx.eps = inputs[5]
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True
            x, target, index = ctx.saved_tensors[:3]
            nan_to_num, reduction, _, group = ctx.options
            _refuse_synced_higher_order(group, "double backward (create_graph=True)")
            composed = functools.partial(reference.batch_mse_composed, index=index, eps=ctx.eps,
                                         nan_to_num=nan_to_num, reduction=reduction)
            return grads_with_graph(composed, x, target, grad_loss, ctx.needs_input_grad[:2]) + (None,) * 8
        return _batch_backward(ctx, grad_loss, backward_fn=_batch_backward_impl)
