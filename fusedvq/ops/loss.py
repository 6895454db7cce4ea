"""The loss as registered ops: norm "none" / "stats" and norm "batch", each a forward and a backward op with
one autograd definition (definition.py).

    fusedvq::masked_mse_forward(x, target, index, inv_ptr, inv_k, shift?, scale?, nan_to_num, reduction,
                                use_triton, gap_at, gap) -> (loss, diff, finite)
    fusedvq::masked_mse_backward(grad, x, target, index, inv_ptr, inv_k, shift?, scale?, diff, finite,
                                 nan_to_num, reduction, use_triton, gap_at, gap, needs_x, needs_target)
                                 -> (grad_x, grad_target)
    fusedvq::batch_mse_forward(x, target, index, inv_ptr, inv_k, eps, nan_to_num, reduction, use_triton,
                               group, gap_at, gap) -> (loss, stats [5, K], colsums [2, K], or [0, K] for none)
    fusedvq::batch_mse_backward(grad, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num,
                                reduction, use_triton, group, gap_at, gap, needs_x, needs_target)
                                -> (grad_x, grad_target)

gap_at, gap: the target is [B, K + gap] and its columns gap_at .. gap_at + gap − 1 are skipped (a hybrid
VQ-VAE's embedding columns), read and written in place; gap = 0 is the plain [B, K] target. needs_x / needs_target: which gradients autograd wants; the other is
neither computed into memory nor written (the op returns a 0-element placeholder for it).

diff and finite are what the forward saves for the backward: the CPU implementation keeps diff [B, K] (and
the finite mask with nan_to_num) to avoid a second gather; the Triton kernels recompute z in the backward,
save nothing but the inputs and return both empty. inv_ptr / inv_k (the ColumnMap's inverse) are inputs
so that autograd saves them for the backward, which writes grad_x as a gather through them.
group: "" for this batch's own statistics, else a key from distributed.group_key (all ranks' rows).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import cpu, cpu_batch, reference
from ..contract import REDUCTION_NONE, compute_dtype
from .definition import Definition, empty, fresh_like, kernels, merge_fn, refuse_synced_higher_order, sum_fn


def placeholders(grads, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """An implementation's (grad_x, grad_target), None where not wanted, as op outputs (0-element there)."""
    grad_x, grad_target = grads
    return (empty(x) if grad_x is None else grad_x), (empty(target) if grad_target is None else grad_target)


def wanted(grads, needs) -> tuple:
    """A backward op's outputs as autograd's gradients: None where not wanted (a placeholder was returned)."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def _loss_shape(x: Tensor, index: Tensor, reduction: int) -> tuple[int, ...]:
    return (x.shape[0], index.shape[0]) if reduction == REDUCTION_NONE else ()


# ------------------------------------------------------------------------------ norm "none" / "stats"


def _masked_forward_impl(
    x: Tensor, target: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor, shift: Optional[Tensor],
    scale: Optional[Tensor], nan_to_num: bool, reduction: int, use_triton: bool, gap_at: int = 0, gap: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton:
        loss = kernels().masked_mse_forward(x, target, index, shift, scale, nan_to_num, reduction, (gap_at, gap))
        return loss, empty(x), empty(x, torch.bool)
    loss, diff, finite = cpu.masked_mse_forward(x, target, index, shift, scale, nan_to_num, reduction,
                                                (gap_at, gap))
    return loss, diff, finite if finite is not None else empty(x, torch.bool)


masked_mse_forward = torch.library.custom_op("fusedvq::masked_mse_forward", mutates_args=())(_masked_forward_impl)


@masked_mse_forward.register_fake
def _(x, target, index, inv_ptr, inv_k, shift, scale, nan_to_num, reduction, use_triton, gap_at=0, gap=0):
    loss = x.new_empty(_loss_shape(x, index, reduction))
    if use_triton:
        return loss, empty(x), empty(x, torch.bool)
    diff = x.new_empty((x.shape[0], index.shape[0]), dtype=compute_dtype(x.dtype))
    return loss, diff, diff.new_empty(diff.shape if nan_to_num else (0,), dtype=torch.bool)


def _masked_backward_impl(
    grad: Tensor, x: Tensor, target: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor,
    shift: Optional[Tensor], scale: Optional[Tensor], diff: Tensor, finite: Tensor, nan_to_num: bool,
    reduction: int, use_triton: bool, gap_at: int = 0, gap: int = 0, needs_x: bool = True,
    needs_target: bool = True,
) -> tuple[Tensor, Tensor]:
    needs = (needs_x, needs_target)
    if use_triton:
        grads = kernels().masked_mse_backward(grad, x, target, inv_ptr, inv_k, shift, scale, nan_to_num, reduction,
                                              (gap_at, gap), needs)
    else:
        grads = cpu.masked_mse_backward(grad, diff, finite if nan_to_num else None, index, scale, x.shape[1],
                                        reduction, x.dtype, target.dtype, needs=needs, gap=(gap_at, gap))
    return placeholders(grads, x, target)


masked_mse_backward = torch.library.custom_op("fusedvq::masked_mse_backward", mutates_args=())(_masked_backward_impl)


@masked_mse_backward.register_fake
def _(grad, x, target, index, inv_ptr, inv_k, shift, scale, diff, finite, nan_to_num, reduction, use_triton,
      gap_at=0, gap=0, needs_x=True, needs_target=True):
    return fresh_like(x) if needs_x else empty(x), fresh_like(target) if needs_target else empty(target)


def _masked_setup_context(ctx, inputs, output):
    x, target, index, inv_ptr, inv_k, shift, scale, nan_to_num, reduction, use_triton, gap_at, gap = inputs
    _, diff, finite = output
    ctx.save_for_backward(x, target, index, inv_ptr, inv_k, shift, scale, diff, finite)
    ctx.options = (nan_to_num, reduction, use_triton, gap_at, gap)
    ctx.diff_spent = False


def _masked_backward(ctx, grad_loss, needs, eager):
    x, target, index, inv_ptr, inv_k, shift, scale, diff, finite = ctx.saved_tensors
    nan_to_num, reduction, use_triton, gap_at, gap = ctx.options
    if eager and not use_triton:
        # The eager CPU path writes grad_target over diff, a buffer of this call's own (saved for this
        # backward alone, never returned): one batch-sized first touch fewer, 20% of a B = 65536 step. The
        # write keeps diff's version (it is not an input's); a second backward through the same graph
        # (retain_graph=True) finds diff spent and computes it again.
        if ctx.diff_spent:
            _, diff, finite = _masked_forward_impl(x, target, index, inv_ptr, inv_k, shift, scale, nan_to_num,
                                                   reduction, False, gap_at, gap)
        ctx.diff_spent = True
        with torch.autograd._unsafe_preserve_version_counter(diff):
            grads = cpu.masked_mse_backward(grad_loss, diff, finite if nan_to_num else None, index, scale,
                                            x.shape[1], reduction, x.dtype, target.dtype, needs=needs,
                                            overwrite_diff=True, gap=(gap_at, gap))
        return (*grads,) + (None,) * 10
    backward = _masked_backward_impl if eager else masked_mse_backward
    grads = backward(grad_loss, x, target, index, inv_ptr, inv_k, shift, scale, diff, finite, nan_to_num,
                     reduction, use_triton, gap_at, gap, *needs)
    return wanted(grads, needs) + (None,) * 10


def _masked_composed(ctx):
    x, target, index, _, _, shift, scale, _, _ = ctx.saved_tensors
    nan_to_num, reduction, _, gap_at, gap = ctx.options
    return functools.partial(reference.masked_mse_composed, index=index, shift=shift, scale=scale,
                             nan_to_num=nan_to_num, reduction=reduction, gap_at=gap_at, gap=gap), (x, target)


MASKED_MSE = Definition("fusedvq::masked_mse_forward", _masked_forward_impl, _masked_setup_context,
                        _masked_backward, _masked_composed, differentiable=2).register()


# ------------------------------------------------------------------------------------ norm "batch"


def _batch_forward_impl(
    x: Tensor, target: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor, eps: float, nan_to_num: bool,
    reduction: int, use_triton: bool, group: str, gap_at: int = 0, gap: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    merge = merge_fn(group, eps)
    if use_triton:
        return kernels().batch_mse_forward(x, target, index, eps, nan_to_num, reduction, merge, (gap_at, gap))
    return cpu_batch.batch_mse_forward(x, target, index, eps, nan_to_num, reduction, merge, (gap_at, gap))


batch_mse_forward = torch.library.custom_op("fusedvq::batch_mse_forward", mutates_args=())(_batch_forward_impl)


def batch_outputs_fake(x: Tensor, index: Tensor, use_triton: bool) -> Tensor:
    """The fake of stats [5, K]: float32 from the kernels, the compute dtype from the CPU implementation."""
    cdt = torch.float32 if use_triton else compute_dtype(x.dtype)
    return x.new_empty((reference.NUM_STATS, index.shape[0]), dtype=cdt)


@batch_mse_forward.register_fake
def _(x, target, index, inv_ptr, inv_k, eps, nan_to_num, reduction, use_triton, group, gap_at=0, gap=0):
    stats = batch_outputs_fake(x, index, use_triton)
    colsums = stats.new_empty((0 if reduction == REDUCTION_NONE else 2, index.shape[0]))  # none: the backward sums
    return x.new_empty(_loss_shape(x, index, reduction)), stats, colsums


def _batch_backward_impl(
    grad: Tensor, x: Tensor, target: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor, stats: Tensor,
    colsums: Tensor, nan_to_num: bool, reduction: int, use_triton: bool, group: str, gap_at: int = 0, gap: int = 0,
    needs_x: bool = True, needs_target: bool = True,
) -> tuple[Tensor, Tensor]:
    total, needs = sum_fn(group), (needs_x, needs_target)
    if use_triton:
        grads = kernels().batch_mse_backward(grad, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num,
                                             reduction, total, (gap_at, gap), needs)
    else:
        grads = cpu_batch.batch_mse_backward(grad, x, target, index, stats, colsums, nan_to_num, reduction, total,
                                             (gap_at, gap), needs)
    return placeholders(grads, x, target)


batch_mse_backward = torch.library.custom_op("fusedvq::batch_mse_backward", mutates_args=())(_batch_backward_impl)


@batch_mse_backward.register_fake
def _(grad, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num, reduction, use_triton, group,
      gap_at=0, gap=0, needs_x=True, needs_target=True):
    return fresh_like(x) if needs_x else empty(x), fresh_like(target) if needs_target else empty(target)


def _batch_setup_context(ctx, inputs, output):
    x, target, index, inv_ptr, inv_k, eps, nan_to_num, reduction, use_triton, group, gap_at, gap = inputs
    _, stats, colsums = output
    ctx.save_for_backward(x, target, index, inv_ptr, inv_k, stats, colsums)
    ctx.options = (eps, nan_to_num, reduction, use_triton, group, gap_at, gap)


def _batch_backward(ctx, grad_loss, needs, eager):
    x, target, index, inv_ptr, inv_k, stats, colsums = ctx.saved_tensors
    _, nan_to_num, reduction, use_triton, group, gap_at, gap = ctx.options
    backward = _batch_backward_impl if eager else batch_mse_backward
    grads = backward(grad_loss, x, target, index, inv_ptr, inv_k, stats, colsums, nan_to_num, reduction,
                     use_triton, group, gap_at, gap, *needs)
    return wanted(grads, needs) + (None,) * 10


def _batch_composed(ctx):
    x, target, index = ctx.saved_tensors[:3]
    eps, nan_to_num, reduction, _, group, gap_at, gap = ctx.options
    refuse_synced_higher_order(group, "double backward (create_graph=True)")
    return functools.partial(reference.batch_mse_composed, index=index, eps=eps, nan_to_num=nan_to_num,
                             reduction=reduction, gap_at=gap_at, gap=gap), (x, target)


BATCH_MSE = Definition("fusedvq::batch_mse_forward", _batch_forward_impl, _batch_setup_context, _batch_backward,
                       _batch_composed, differentiable=2).register()
