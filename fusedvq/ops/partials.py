"""P partial reconstructions against one target as registered ops, with named arguments (reference.py's
partials_composed states the math):

    fusedvq::partials_mse_forward(z, partials, *, reduction, gap_at, gap, use_triton) -> loss
    fusedvq::partials_mse_backward(grad, z, partials, *, reduction, gap_at, gap, use_triton, needs_z,
                                   needs_partials) -> (grad_z, grad_partials)

z [B, K]: the cleaned target (clean_features' output, normalized and gathered once); partials [P, B, K + gap]
in z's dtype, any strides, their columns gap_at .. gap_at + gap − 1 skipped (a hybrid decoder's embedding
columns: zero gradient); reduction: "mean" (a 0-d loss) or "column" ([P, K]) by its code (kernels/plan.py);
use_triton: the kernels (kernels/partials.py), else the CPU implementation (cpu/partials.py). The gradient
not wanted is neither computed nor written (a 0-element placeholder comes back). Nothing is saved but the
inputs: the backward recomputes the difference (one read of the partials each way).

call_partials is the routing point of this op, as call_loss is the loss's (ops/__init__.py): traced calls
take the registered op, calls under torch.func the composition, eager calls its OpAutograd through
EagerAutograd (its backward, or the composition's autograd under create_graph=True).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from ..cpu import partials as cpu_partials
from ..kernels.plan import REDUCTION_COLUMN
from . import EagerAutograd
from .autograd import IMPLEMENTATIONS, REGISTERED, OpAutograd, under_functorch


class PartialsMode(NamedTuple):
    """What one call of the op computes (the op's keyword arguments, as one record)."""

    reduction: int  # REDUCTION_MEAN or REDUCTION_COLUMN
    gap_at: int
    gap: int
    use_triton: bool


def call_partials(z: Tensor, partials, mode: PartialsMode) -> Tensor:
    """The loss of z [B, K] against partials [P, B, K + gap], or a list of P [B, K + gap] (checked by the
    caller). Eager CPU calls take a list as it is (_ListPartials); elsewhere it is stacked."""
    if not isinstance(partials, Tensor):
        if not (mode.use_triton or torch.compiler.is_compiling() or under_functorch() or z.device.type != "cpu"):
            return _ListPartials.apply(z, mode, *partials)
        partials = torch.stack(partials)
    if torch.compiler.is_compiling():
        return partials_mse_forward(z, partials, **mode._asdict())
    if under_functorch():
        return reference.partials_composed(z, partials, mode.reduction, (mode.gap_at, mode.gap))
    return EagerAutograd.apply(PARTIALS_MSE, z, partials, mode)


class _ListPartials(torch.autograd.Function):
    """The CPU implementation on a list of partials: above a small batch read in place (cpu/partials.py's
    list_forward and list_backward), each partial with a gradient of its own; create_graph=True
    differentiates the composition of the stacked partials."""

    @staticmethod
    def forward(ctx, z: Tensor, mode: PartialsMode, *partials: Tensor) -> Tensor:
        gap = (mode.gap_at, mode.gap)
        ctx.mode, ctx.in_place = mode, cpu_partials.read_in_place(z, partials)
        if ctx.in_place:
            ctx.save_for_backward(z, *partials)
            return cpu_partials.list_forward(z, list(partials), mode.reduction, gap)
        # A small batch: stacked here, outside autograd (one node, not a stack node beside this one), then
        # aten's few MSE ops; the backward hands each partial a view of one gradient.
        stacked = torch.stack(partials)
        ctx.save_for_backward(z, stacked, *partials)  # (the partials themselves for create_graph=True)
        return cpu_partials.partials_forward(z, stacked, mode.reduction, gap)

    @staticmethod
    def backward(ctx, grad):
        z, *saved = ctx.saved_tensors
        partials = saved if ctx.in_place else saved[1:]
        mode, needs = ctx.mode, (ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:]))
        gap, count = (mode.gap_at, mode.gap), len(partials)
        if torch.is_grad_enabled():  # create_graph=True: the composition's own gradients, stacked anew
            stacked = torch.stack(partials)  # (on the partials' graph, so the gradients are differentiable)
            loss = reference.partials_composed(z, stacked, mode.reduction, gap)
            grad_z, grad_p = reference.grads_through(loss, (z, stacked), needs, grad)
            return (grad_z, None, *(grad_p.unbind(0) if grad_p is not None else [None] * count))
        if ctx.in_place:
            grad_z, grads = cpu_partials.list_backward(grad, z, partials, mode.reduction, gap, needs)
        else:
            grad_z, grad_p = cpu_partials.partials_backward(grad, z, saved[0], mode.reduction, gap, needs)
            grads = None if grad_p is None else grad_p.unbind(0)
        return (grad_z, None, *(grads if grads is not None else [None] * count))


def _kernels():
    """kernels/partials.py (imported on first use: it imports triton)."""
    from ..kernels import partials as module

    return module


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _loss_shape(z: Tensor, partials: Tensor, reduction: int) -> tuple[int, ...]:
    return (partials.shape[0], z.shape[1]) if reduction == REDUCTION_COLUMN else ()


def _forward(z: Tensor, partials: Tensor, mode: PartialsMode) -> Tensor:
    impl = _kernels() if mode.use_triton else cpu_partials
    return impl.partials_forward(z, partials, mode.reduction, (mode.gap_at, mode.gap))


def _backward(grad: Tensor, z: Tensor, partials: Tensor, mode: PartialsMode, needs: tuple,
              eager: bool = False) -> tuple[Tensor, Tensor]:
    gap = (mode.gap_at, mode.gap)
    if mode.use_triton:
        grads = _kernels().partials_backward(grad, z, partials, mode.reduction, gap, needs)
    else:  # (eager: the gradient may live in the spare buffer, which a registered op's output never does)
        grads = cpu_partials.partials_backward(grad, z, partials, mode.reduction, gap, needs, reuse=eager)
    return tuple(_empty(like) if g is None else g for g, like in zip(grads, (z, partials)))


@torch.library.custom_op("fusedvq::partials_mse_forward", mutates_args=())
def partials_mse_forward(z: Tensor, partials: Tensor, *, reduction: int, gap_at: int, gap: int,
                         use_triton: bool) -> Tensor:
    return _forward(z, partials, PartialsMode(reduction, gap_at, gap, use_triton))


@partials_mse_forward.register_fake
def _(z, partials, *, reduction, gap_at, gap, use_triton):
    return z.new_empty(_loss_shape(z, partials, reduction))


@torch.library.custom_op("fusedvq::partials_mse_backward", mutates_args=())
def partials_mse_backward(grad: Tensor, z: Tensor, partials: Tensor, *, reduction: int, gap_at: int, gap: int,
                          use_triton: bool, needs_z: bool, needs_partials: bool) -> tuple[Tensor, Tensor]:
    return _backward(grad, z, partials, PartialsMode(reduction, gap_at, gap, use_triton), (needs_z, needs_partials))


@partials_mse_backward.register_fake
def _(grad, z, partials, *, reduction, gap_at, gap, use_triton, needs_z, needs_partials):
    fresh = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    return fresh(z) if needs_z else _empty(z), fresh(partials) if needs_partials else _empty(partials)


# ------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    z, partials, mode = inputs
    ctx.save_for_backward(z, partials)
    ctx.mode = mode


def _definition_backward(ctx, grad, needs):
    z, partials = ctx.saved_tensors
    grads = ctx.ops.partials_mse_backward(grad, z, partials, ctx.mode, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


# The backward op as ctx.ops reaches it (autograd.py): eagerly the gradient may live in the spare buffer.
IMPLEMENTATIONS.partials_mse_backward = functools.partial(_backward, eager=True)
REGISTERED.partials_mse_backward = lambda grad, z, partials, mode, needs: partials_mse_backward(
    grad, z, partials, **mode._asdict(), needs_z=needs[0], needs_partials=needs[1])


def _composed(ctx):
    z, partials = ctx.saved_tensors
    mode = ctx.mode
    return functools.partial(reference.partials_composed, reduction=mode.reduction,
                             gap=(mode.gap_at, mode.gap)), (z, partials)


PARTIALS_MSE = OpAutograd("fusedvq::partials_mse_forward", _forward, _setup_context, _definition_backward,
                          _composed, grad_positions=(0, 1), options=PartialsMode).register()
