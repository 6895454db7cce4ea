"""clean_features as registered ops: z = the normalized kept columns, and its VJP (reference.py states both).

    fusedvq::clean_forward(x, index, inv_ptr, inv_k, shift?, scale?, nan_to_num, use_triton) -> z [B, K]
    fusedvq::clean_backward(grad_z, x, index, inv_ptr, inv_k, shift?, scale?, nan_to_num, use_triton)
        -> grad_x [B, D]
    fusedvq::batch_clean_forward(x, index, inv_ptr, inv_k, eps, nan_to_num, use_triton, group)
        -> (z [B, K], stats [5, K])
    fusedvq::batch_clean_backward(grad_z, x, index, inv_ptr, inv_k, stats, nan_to_num, use_triton, group)
        -> grad_x [B, D]

Nothing batch-sized is saved beyond the inputs: the backward of norm "none"/"stats" needs x only for its
finite mask (nan_to_num), and that of norm "batch" recomputes z from x and the saved statistics.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import cpu, cpu_batch, reference
from .definition import Definition, fresh_like, kernels, merge_fn, refuse_synced_higher_order, sum_fn
from .loss import batch_outputs_fake


def _z_fake(x: Tensor, index: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], index.shape[0]))


# ------------------------------------------------------------------------------ norm "none" / "stats"


def _clean_forward_impl(
    x: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor, shift: Optional[Tensor], scale: Optional[Tensor],
    nan_to_num: bool, use_triton: bool,
) -> Tensor:
    if use_triton:
        return kernels().clean_forward(x, index, shift, scale, nan_to_num)
    return cpu.clean_forward(x, index, shift, scale, nan_to_num)


clean_forward = torch.library.custom_op("fusedvq::clean_forward", mutates_args=())(_clean_forward_impl)


@clean_forward.register_fake
def _(x, index, inv_ptr, inv_k, shift, scale, nan_to_num, use_triton):
    return _z_fake(x, index)


def _clean_backward_impl(
    grad_z: Tensor, x: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor, shift: Optional[Tensor],
    scale: Optional[Tensor], nan_to_num: bool, use_triton: bool,
) -> Tensor:
    if use_triton:
        return kernels().clean_backward(grad_z, x, inv_ptr, inv_k, shift, scale, nan_to_num)
    return cpu.clean_backward(grad_z, x, index, scale, nan_to_num)


clean_backward = torch.library.custom_op("fusedvq::clean_backward", mutates_args=())(_clean_backward_impl)


@clean_backward.register_fake
def _(grad_z, x, index, inv_ptr, inv_k, shift, scale, nan_to_num, use_triton):
    return fresh_like(x)


def _clean_setup_context(ctx, inputs, output):
    x, index, inv_ptr, inv_k, shift, scale, nan_to_num, use_triton = inputs
    ctx.save_for_backward(x, index, inv_ptr, inv_k, shift, scale)
    ctx.options = (nan_to_num, use_triton)


def _clean_backward(ctx, grad_z, needs, eager):
    x, index, inv_ptr, inv_k, shift, scale = ctx.saved_tensors
    nan_to_num, use_triton = ctx.options
    backward = _clean_backward_impl if eager else clean_backward
    return backward(grad_z, x, index, inv_ptr, inv_k, shift, scale, nan_to_num, use_triton), *(None,) * 7


def _clean_composed(ctx):
    x, index, _, _, shift, scale = ctx.saved_tensors
    nan_to_num, _ = ctx.options
    return functools.partial(reference.clean_composed, index=index, shift=shift, scale=scale,
                             nan_to_num=nan_to_num), (x,)


CLEAN = Definition("fusedvq::clean_forward", _clean_forward_impl, _clean_setup_context, _clean_backward,
                   _clean_composed, differentiable=1).register()


# ------------------------------------------------------------------------------------ norm "batch"


def _batch_clean_forward_impl(
    x: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor, eps: float, nan_to_num: bool, use_triton: bool,
    group: str,
) -> tuple[Tensor, Tensor]:
    merge = merge_fn(group, eps)
    if use_triton:
        return kernels().batch_clean_forward(x, index, eps, nan_to_num, merge)
    return cpu_batch.batch_clean_forward(x, index, eps, nan_to_num, merge)


batch_clean_forward = torch.library.custom_op("fusedvq::batch_clean_forward", mutates_args=())(
    _batch_clean_forward_impl
)


@batch_clean_forward.register_fake
def _(x, index, inv_ptr, inv_k, eps, nan_to_num, use_triton, group):
    return _z_fake(x, index), batch_outputs_fake(x, index, use_triton)


def _batch_clean_backward_impl(
    grad_z: Tensor, x: Tensor, index: Tensor, inv_ptr: Tensor, inv_k: Tensor, stats: Tensor, nan_to_num: bool,
    use_triton: bool, group: str,
) -> Tensor:
    total = sum_fn(group)
    if use_triton:
        return kernels().batch_clean_backward(grad_z, x, index, inv_ptr, inv_k, stats, nan_to_num, total)
    return cpu_batch.batch_clean_backward(grad_z, x, index, stats, nan_to_num, total)


batch_clean_backward = torch.library.custom_op("fusedvq::batch_clean_backward", mutates_args=())(
    _batch_clean_backward_impl
)


@batch_clean_backward.register_fake
def _(grad_z, x, index, inv_ptr, inv_k, stats, nan_to_num, use_triton, group):
    return fresh_like(x)


def _batch_clean_setup_context(ctx, inputs, output):
    x, index, inv_ptr, inv_k, eps, nan_to_num, use_triton, group = inputs
    ctx.save_for_backward(x, index, inv_ptr, inv_k, output[1])
    ctx.options = (eps, nan_to_num, use_triton, group)


def _batch_clean_backward(ctx, grad_z, needs, eager):
    x, index, inv_ptr, inv_k, stats = ctx.saved_tensors
    _, nan_to_num, use_triton, group = ctx.options
    backward = _batch_clean_backward_impl if eager else batch_clean_backward
    return backward(grad_z, x, index, inv_ptr, inv_k, stats, nan_to_num, use_triton, group), *(None,) * 7


def _batch_clean_composed(ctx):
    x, index = ctx.saved_tensors[:2]
    eps, nan_to_num, _, group = ctx.options
    refuse_synced_higher_order(group, "double backward (create_graph=True)")
    return functools.partial(reference.batch_clean_composed, index=index, eps=eps, nan_to_num=nan_to_num), (x,)


BATCH_CLEAN = Definition("fusedvq::batch_clean_forward", _batch_clean_forward_impl, _batch_clean_setup_context,
                         _batch_clean_backward, _batch_clean_composed, differentiable=1).register()
