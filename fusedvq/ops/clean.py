"""clean_features as registered ops: z = the normalized kept columns, and its VJP (reference.py states both).

    fusedvq::clean_forward(Tensor x, Tensor[] columns, Tensor[] affine, *, bool nan_to_num, bool use_triton)
        -> z [B, K]
    fusedvq::clean_backward(Tensor grad_z, Tensor x, Tensor[] columns, Tensor[] affine, *, <options>)
        -> grad_x [B, D]
    fusedvq::batch_clean_forward(Tensor x, Tensor[] columns, float eps, str group, *, <options>)
        -> (z [B, K], moments [5, K])
    fusedvq::batch_clean_backward(Tensor grad_z, Tensor x, Tensor[] columns, Tensor moments, str group, *,
        <options>) -> grad_x [B, D]

columns, affine, moments and group as in loss.py; the options (CleanOptions): nan_to_num and use_triton. Nothing
batch-sized is saved beyond the inputs: the backward of norm "none"/"stats" needs x only for its finite
mask (nan_to_num), and that of norm "batch" recomputes z from x and the saved statistics.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .. import kernels
from .. import reference
from ..cpu import batch as cpu_batch
from ..cpu import blocked as cpu_blocked
from ..kernels.plan import NORM_BATCH, Mode
from .autograd import OpAutograd, define_op, refuse_synced_higher_order
from .distributed import merged_moments_fn, sum_over_ranks_fn
from .loss import batch_outputs_fake


class CleanOptions(NamedTuple):
    """The clean ops' keyword-only options, as one record (the schemas name each field)."""

    nan_to_num: bool
    use_triton: bool  # the kernels (kernels/), else the CPU implementations (cpu/)


_OPTIONS = "*, bool nan_to_num, bool use_triton"


def _fresh(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------ norm "none" / "stats"


def _clean_forward(x: Tensor, columns: list, affine: list, options: CleanOptions) -> Tensor:
    impl = kernels if options.use_triton else cpu_blocked
    return impl.clean_forward(x, columns[0], tuple(affine), Mode(nan_to_num=options.nan_to_num))


clean_forward = define_op(
    "clean_forward", f"(Tensor x, Tensor[] columns, Tensor[] affine, {_OPTIONS}) -> Tensor", _clean_forward,
    lambda x, columns, affine, options: x.new_empty((x.shape[0], columns[0].shape[0])), (CleanOptions,))


def _clean_backward(grad_z: Tensor, x: Tensor, columns: list, affine: list, options: CleanOptions) -> Tensor:
    mode = Mode(nan_to_num=options.nan_to_num)
    if options.use_triton:
        return kernels.clean_backward(grad_z, x, (columns[1], columns[2]), tuple(affine), mode)
    return cpu_blocked.clean_backward(grad_z, x, columns[0], tuple(affine), mode)


clean_backward = define_op(
    "clean_backward", f"(Tensor grad_z, Tensor x, Tensor[] columns, Tensor[] affine, {_OPTIONS}) -> Tensor",
    _clean_backward, lambda grad_z, x, columns, affine, options: _fresh(x), (CleanOptions,))


def _clean_setup_context(ctx, inputs, output):
    x, columns, affine, options = inputs
    ctx.save_for_backward(x, *columns, *affine)
    ctx.options = options


def _clean_backward_def(ctx, grad_z, needs):
    x, *rest = ctx.saved_tensors
    return (ctx.ops.clean_backward(grad_z, x, rest[:3], rest[3:], ctx.options),)


def _clean_composed(ctx):
    x, index, _, _, *affine = ctx.saved_tensors
    shift, scale = affine if affine else (None, None)
    return functools.partial(reference.clean_composed, index=index, shift=shift, scale=scale,
                             nan_to_num=ctx.options.nan_to_num), (x,)


CLEAN = OpAutograd("fusedvq::clean_forward", _clean_forward, _clean_setup_context, _clean_backward_def,
                   _clean_composed, grad_positions=(0,), options=CleanOptions).register()


# ------------------------------------------------------------------------------------ norm "batch"


def _batch_clean_forward(x: Tensor, columns: list, eps: float, group: str,
                         options: CleanOptions) -> tuple[Tensor, Tensor]:
    impl = kernels if options.use_triton else cpu_batch
    merge = merged_moments_fn(group, eps) if group else None
    return impl.batch_clean_forward(x, columns[0], eps, Mode(NORM_BATCH, options.nan_to_num), merge)


batch_clean_forward = define_op(
    "batch_clean_forward", f"(Tensor x, Tensor[] columns, float eps, str group, {_OPTIONS}) -> (Tensor, Tensor)",
    _batch_clean_forward, lambda x, columns, eps, group, options: (
        x.new_empty((x.shape[0], columns[0].shape[0])), batch_outputs_fake(x, columns[0], options.use_triton)),
    (CleanOptions,))


def _batch_clean_backward(grad_z: Tensor, x: Tensor, columns: list, moments: Tensor, group: str,
                          options: CleanOptions) -> Tensor:
    total = sum_over_ranks_fn(group) if group else None
    if options.use_triton:
        impl, columns = kernels, tuple(columns)
    else:
        impl, columns = cpu_batch, columns[0]
    return impl.batch_clean_backward(grad_z, x, columns, moments, Mode(NORM_BATCH, options.nan_to_num), total)


batch_clean_backward = define_op(
    "batch_clean_backward", f"(Tensor grad_z, Tensor x, Tensor[] columns, Tensor moments, str group, {_OPTIONS}) -> "
    "Tensor", _batch_clean_backward, lambda grad_z, x, columns, moments, group, options: _fresh(x), (CleanOptions,))


def _batch_clean_setup_context(ctx, inputs, output):
    x, columns, eps, group, options = inputs
    ctx.save_for_backward(x, *columns, output[1])
    ctx.eps, ctx.group, ctx.options = eps, group, options


def _batch_clean_backward_def(ctx, grad_z, needs):
    x, *columns, moments = ctx.saved_tensors
    return (ctx.ops.batch_clean_backward(grad_z, x, columns, moments, ctx.group, ctx.options),)


def _batch_clean_composed(ctx):
    x, index = ctx.saved_tensors[:2]
    refuse_synced_higher_order(ctx.group, "double backward (create_graph=True)")
    return functools.partial(reference.batch_clean_composed, index=index, eps=ctx.eps,
                             nan_to_num=ctx.options.nan_to_num), (x,)


BATCH_CLEAN = OpAutograd("fusedvq::batch_clean_forward", _batch_clean_forward, _batch_clean_setup_context,
                         _batch_clean_backward_def, _batch_clean_composed, grad_positions=(0,),
                         options=CleanOptions).register()
