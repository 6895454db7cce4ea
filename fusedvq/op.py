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
Traced calls (torch.compile, torch.export) run these ops; eager calls run the same implementations
through calls.py, without the ops' dispatch.
Arguments are validated by the callers (functional.py, module.py) before they reach these ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu, reference
from .contract import REDUCTION_NONE, compute_dtype


_kernels_module = None


def kernels():
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
        loss = kernels().masked_mse_forward(x, target, index, shift, scale, nan_to_num, reduction)
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
        return kernels().masked_mse_backward(
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
        return kernels().batch_mse_forward(x, target, index, eps, nan_to_num, reduction, merge)
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
        return kernels().batch_mse_backward(
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
