"""How a call reaches the loss's implementations, with autograd attached (arguments already canonical and
valid, from functional.py / module.py).

Traced (torch.compile, torch.export), it is the registered ops of op.py, which the tracer needs. Eager, the
ops' dispatch (schema parsing, the dispatcher, the generated autograd node) would cost about 190 µs per
forward+backward on a 2-core CPU: more than the whole loss of a small batch, and on a GPU host the
difference between a fused step and an unfused one at B = 4. Eager calls therefore run the same
implementations directly:
    norm="batch"          _EagerBatch, on the op's own implementations, setup_context and backward
    norm "none"/"stats"   _EagerKernels (Triton); _EagerReference (CPU, large B: its backward writes
                          grad_target over the forward's diff, 20% of a B = 65536 step); or the plain
                          composition of reference.py (CPU, small B: autograd's C++ backward has the least
                          per-op overhead, 60 µs against 130 µs a step at B = 4)
A backward with create_graph=True, and torch.func transforms, take the plain composition of reference.py,
which autograd differentiates to any order.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import cpu, reference
from .columns import ColumnMap
from .op import (
    _batch_backward,
    _batch_backward_impl,
    _batch_forward_impl,
    _batch_setup_context,
    batch_mse_forward,
    kernels,
    masked_mse_forward,
)


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


# ------------------------------------------------------------------------------------ eager autograd


class _EagerKernels(torch.autograd.Function):
    """Eager Triton path of norm "none"/"stats": the two kernel launches and as little else as possible,
    since at small B the step is host work. Every tensor the backward reads goes through save_for_backward
    (saved-tensor hooks see them, and autograd checks that none was modified in place)."""

    @staticmethod
    def forward(ctx, x, target, rest):
        columns, shift, scale, nan_to_num, reduction = rest
        ctx.save_for_backward(x, target, columns.index, columns.inv_ptr, columns.inv_k, shift, scale)
        ctx.options = (nan_to_num, reduction)
        return kernels().masked_mse_forward(x, target, columns.index, shift, scale, nan_to_num, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        x, target, index, inv_ptr, inv_k, shift, scale = ctx.saved_tensors
        nan_to_num, reduction = ctx.options
        if torch.is_grad_enabled():  # create_graph=True
            composed = functools.partial(reference.masked_mse_composed, index=index, shift=shift, scale=scale,
                                         nan_to_num=nan_to_num, reduction=reduction)
            return (*grads_with_graph(composed, x, target, grad_loss, ctx.needs_input_grad[:2]), None)
        grad_x, grad_target = kernels().masked_mse_backward(
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
