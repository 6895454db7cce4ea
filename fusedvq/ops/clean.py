"""clean_features as registered ops: z = the normalized kept columns, and its VJP (reference.py states both).

    fusedvq::clean_forward(x, columns, stats, mode) -> z [B, K]
    fusedvq::clean_backward(grad_z, x, columns, stats, mode) -> grad_x [B, D]
    fusedvq::batch_clean_forward(x, columns, eps, group, mode) -> (z [B, K], stats [5, K])
    fusedvq::batch_clean_backward(grad_z, x, columns, stats, group, mode) -> grad_x [B, D]

columns, stats, mode and group as in loss.py (mode's reduction and gap unused). Nothing batch-sized is saved
beyond the inputs: the backward of norm "none"/"stats" needs x only for its finite mask (nan_to_num), and
that of norm "batch" recomputes z from x and the saved statistics.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from ..cpu import batch as cpu_batch
from ..cpu import stats as cpu_stats
from ..kernels.plan import NORM_BATCH
from . import Definition, kernels, refuse_synced_higher_order
from .distributed import merged_stats_fn, sum_over_ranks_fn
from . import autocast_off, kernel_mode
from .loss import batch_outputs_fake


def _fresh(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------ norm "none" / "stats"


@autocast_off
def _clean_forward(x: Tensor, columns: list[Tensor], stats: list[Tensor], mode: list[int]) -> Tensor:
    impl = kernels() if mode[2] else cpu_stats
    return impl.clean_forward(x, columns[0], tuple(stats), kernel_mode(mode))


clean_forward = torch.library.custom_op("fusedvq::clean_forward", mutates_args=())(_clean_forward)


@clean_forward.register_fake
def _(x, columns, stats, mode):
    return x.new_empty((x.shape[0], columns[0].shape[0]))


@autocast_off
def _clean_backward(grad_z: Tensor, x: Tensor, columns: list[Tensor], stats: list[Tensor], mode: list[int]) -> Tensor:
    if mode[2]:
        return kernels().clean_backward(grad_z, x, (columns[1], columns[2]), tuple(stats), kernel_mode(mode))
    return cpu_stats.clean_backward(grad_z, x, columns[0], tuple(stats), kernel_mode(mode))


clean_backward = torch.library.custom_op("fusedvq::clean_backward", mutates_args=())(_clean_backward)


@clean_backward.register_fake
def _(grad_z, x, columns, stats, mode):
    return _fresh(x)


def _clean_setup_context(ctx, inputs, output):
    x, columns, stats, mode = inputs
    ctx.save_for_backward(x, *columns, *stats)
    ctx.mode = list(mode)


def _clean_backward_def(ctx, grad_z, needs, eager):
    x, *rest = ctx.saved_tensors
    backward = _clean_backward if eager else clean_backward
    return backward(grad_z, x, rest[:3], rest[3:], ctx.mode), None, None, None


def _clean_composed(ctx):
    x, index, _, _, *stats = ctx.saved_tensors
    shift, scale = stats if stats else (None, None)
    return functools.partial(reference.clean_composed, index=index, shift=shift, scale=scale,
                             nan_to_num=bool(ctx.mode[0])), (x,)


CLEAN = Definition("fusedvq::clean_forward", _clean_forward, _clean_setup_context, _clean_backward_def,
                   _clean_composed, differentiable=1).register()


# ------------------------------------------------------------------------------------ norm "batch"


@autocast_off
def _batch_clean_forward(x: Tensor, columns: list[Tensor], eps: float, group: str,
                         mode: list[int]) -> tuple[Tensor, Tensor]:
    impl = kernels() if mode[2] else cpu_batch
    merge = merged_stats_fn(group, eps) if group else None
    return impl.batch_clean_forward(x, columns[0], eps, kernel_mode(mode, NORM_BATCH), merge)


batch_clean_forward = torch.library.custom_op("fusedvq::batch_clean_forward", mutates_args=())(_batch_clean_forward)


@batch_clean_forward.register_fake
def _(x, columns, eps, group, mode):
    return x.new_empty((x.shape[0], columns[0].shape[0])), batch_outputs_fake(x, columns[0], mode[2])


@autocast_off
def _batch_clean_backward(grad_z: Tensor, x: Tensor, columns: list[Tensor], stats: Tensor, group: str,
                          mode: list[int]) -> Tensor:
    total = sum_over_ranks_fn(group) if group else None
    if mode[2]:
        impl, columns = kernels(), tuple(columns)
    else:
        impl, columns = cpu_batch, columns[0]
    return impl.batch_clean_backward(grad_z, x, columns, stats, kernel_mode(mode, NORM_BATCH), total)


batch_clean_backward = torch.library.custom_op("fusedvq::batch_clean_backward", mutates_args=())(_batch_clean_backward)


@batch_clean_backward.register_fake
def _(grad_z, x, columns, stats, group, mode):
    return _fresh(x)


def _batch_clean_setup_context(ctx, inputs, output):
    x, columns, eps, group, mode = inputs
    ctx.save_for_backward(x, *columns, output[1])
    ctx.options = (eps, group, list(mode))


def _batch_clean_backward_def(ctx, grad_z, needs, eager):
    x, *columns, stats = ctx.saved_tensors
    _, group, mode = ctx.options
    backward = _batch_clean_backward if eager else batch_clean_backward
    return backward(grad_z, x, columns, stats, group, mode), None, None, None, None


def _batch_clean_composed(ctx):
    x, index = ctx.saved_tensors[:2]
    eps, group, mode = ctx.options
    refuse_synced_higher_order(group, "double backward (create_graph=True)")
    return functools.partial(reference.batch_clean_composed, index=index, eps=eps, nan_to_num=bool(mode[0])), (x,)


BATCH_CLEAN = Definition("fusedvq::batch_clean_forward", _batch_clean_forward, _batch_clean_setup_context,
                         _batch_clean_backward_def, _batch_clean_composed, differentiable=1).register()
