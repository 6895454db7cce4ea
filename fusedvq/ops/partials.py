"""P partial reconstructions against one target as registered ops, with named arguments (reference.py's
partials_composed states the math):

    fusedvq::partials_mse_forward(z, partials, embeddings, *, reduction, gap_at, gap_width, use_triton)
        -> loss
    fusedvq::partials_mse_backward(grad, z, partials, embeddings, *, reduction, gap_at, gap_width,
                                   use_triton, needs) -> (grad_z, grad_partials, grad_embeddings)

z [B, K]: the cleaned target (clean_features' output, normalized and gathered once); partials [P, B, K + gap]
in z's dtype, any strides, their columns gap_at .. gap_at + gap_width − 1 skipped (a hybrid decoder's
embedding columns: zero gradient), or, with embeddings [B, gap_width] (a hybrid's objective), compared with
the embeddings, read in place: every partial against combined(z, embeddings) over all K + gap_width
columns; reduction: "mean" (a 0-d loss) or "column" ([P, K], [P, K + gap_width] with embeddings) by its
code (kernels/plan.py); use_triton: the kernels (kernels/partials.py), else the CPU implementation
(cpu/partials.py). needs: [z, partials, embeddings] — a gradient not wanted is neither computed nor written
(a 0-element placeholder comes back). Nothing is saved but the inputs: the backward recomputes the
difference (one read of the partials each way).

call_partials is the routing point of this op, as call_loss is the loss's (ops/__init__.py): traced calls
take the registered op, calls under torch.func the composition, eager calls its OpAutograd through
EagerAutograd (its backward, or the composition's autograd under create_graph=True).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from ..cpu import partials as cpu_partials
from ..kernels.plan import REDUCTION_COLUMN, Gap
from . import EagerAutograd
from .autograd import IMPLEMENTATIONS, REGISTERED, OpAutograd, under_functorch


class PartialsMode(NamedTuple):
    """What one call of the op computes (the op's keyword arguments, as one record)."""

    reduction: int  # REDUCTION_MEAN or REDUCTION_COLUMN
    gap_at: int
    gap_width: int
    use_triton: bool

    gap = property(lambda self: Gap(self.gap_at, self.gap_width))


def call_partials(z: Tensor, partials, mode: PartialsMode, embeddings: Optional[Tensor] = None) -> Tensor:
    """The loss of z [B, K] (with embeddings [B, c]: combined(z, embeddings)) against partials [P, B, K + c], or
    a list of P [B, K + c] (checked by the caller). Eager CPU calls take a list as it is (_ListPartials);
    elsewhere it is stacked."""
    if not isinstance(partials, Tensor):
        if not (mode.use_triton or torch.compiler.is_compiling() or under_functorch() or z.device.type != "cpu"):
            return _ListPartials.apply(z, embeddings, mode, *partials)
        partials = torch.stack(partials)
    if torch.compiler.is_compiling():
        return partials_mse_forward(z, partials, embeddings, **mode._asdict())
    if under_functorch():
        return reference.partials_composed(z, partials, mode.reduction, mode.gap, embeddings)
    return EagerAutograd.apply(PARTIALS_MSE, z, partials, embeddings, mode)


class _ListPartials(torch.autograd.Function):
    """The CPU implementation on a list of partials: above a small batch read in place (cpu/partials.py's
    list_forward and list_backward), each partial with a gradient of its own; create_graph=True
    differentiates the composition of the stacked partials."""

    @staticmethod
    def forward(ctx, z: Tensor, embeddings: Optional[Tensor], mode: PartialsMode, *partials: Tensor) -> Tensor:
        gap, embedded = mode.gap, [] if embeddings is None else [embeddings]
        ctx.mode, ctx.in_place, ctx.embedded = mode, cpu_partials.read_in_place(z, partials), bool(embedded)
        if ctx.in_place:
            ctx.save_for_backward(z, *embedded, *partials)
            return cpu_partials.list_forward(z, list(partials), mode.reduction, gap, embeddings)
        # A small batch: stacked here, outside autograd (one node, not a stack node beside this one), then
        # aten's few MSE ops; the backward hands each partial a view of one gradient.
        stacked = torch.stack(partials)
        ctx.save_for_backward(z, *embedded, stacked, *partials)  # (the partials themselves for create_graph=True)
        return cpu_partials.partials_forward(z, stacked, mode.reduction, gap, embeddings)

    @staticmethod
    def backward(ctx, grad):
        z, *saved = ctx.saved_tensors
        embeddings = saved.pop(0) if ctx.embedded else None
        partials = saved if ctx.in_place else saved[1:]
        mode, wants = ctx.mode, ctx.needs_input_grad
        needs, gap, count = (wants[0], any(wants[3:]), wants[1]), mode.gap, len(partials)
        if torch.is_grad_enabled():  # create_graph=True: the composition's own gradients, stacked anew
            stacked = torch.stack(partials)  # (on the partials' graph, so the gradients are differentiable)
            loss = reference.partials_composed(z, stacked, mode.reduction, gap, embeddings)
            inputs = (z, stacked, *([embeddings] if ctx.embedded else []))
            grad_z, grad_p, grad_e = (*reference.grads_through(loss, inputs, needs[: len(inputs)], grad), None)[:3]
            return (grad_z, grad_e, None, *(grad_p.unbind(0) if grad_p is not None else [None] * count))
        if ctx.in_place:
            grad_z, grads, grad_e = (*cpu_partials.list_backward(grad, z, partials, mode.reduction, gap, needs,
                                                                 embeddings), None)[:3]
        else:
            grad_z, grad_p, grad_e = (*cpu_partials.partials_backward(grad, z, saved[0], mode.reduction, gap, needs,
                                                                      embeddings=embeddings), None)[:3]
            grads = None if grad_p is None else grad_p.unbind(0)
        return (grad_z, grad_e, None, *(grads if grads is not None else [None] * count))


def _kernels():
    """kernels/partials.py (imported on first use: it imports triton)."""
    from ..kernels import partials as module

    return module


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _loss_shape(z: Tensor, partials: Tensor, reduction: int, embeddings: Optional[Tensor]) -> tuple[int, ...]:
    width = z.shape[1] if embeddings is None else partials.shape[2]
    return (partials.shape[0], width) if reduction == REDUCTION_COLUMN else ()


def _forward(z: Tensor, partials: Tensor, embeddings: Optional[Tensor], mode: PartialsMode) -> Tensor:
    impl = _kernels() if mode.use_triton else cpu_partials
    return impl.partials_forward(z, partials, mode.reduction, mode.gap, embeddings)


def _backward(grad: Tensor, z: Tensor, partials: Tensor, mode: PartialsMode, needs: tuple, eager: bool = False,
              embeddings: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_z, grad_partials, grad_embeddings), 0-element placeholders where needs (z, partials, embeddings)
    says not (or there are no embeddings)."""
    gap = mode.gap
    if mode.use_triton:
        grads = _kernels().partials_backward(grad, z, partials, mode.reduction, gap, needs, embeddings)
    else:  # (eager: the gradient may live in the spare buffer, which a registered op's output never does)
        grads = cpu_partials.partials_backward(grad, z, partials, mode.reduction, gap, needs, eager, embeddings)
    return tuple(_empty(z) if g is None else g for g in (*grads, None)[:3])


@torch.library.custom_op("fusedvq::partials_mse_forward", mutates_args=())
def partials_mse_forward(z: Tensor, partials: Tensor, embeddings: Optional[Tensor], *, reduction: int,
                         gap_at: int, gap_width: int, use_triton: bool) -> Tensor:
    return _forward(z, partials, embeddings, PartialsMode(reduction, gap_at, gap_width, use_triton))


@partials_mse_forward.register_fake
def _(z, partials, embeddings, *, reduction, gap_at, gap_width, use_triton):
    return z.new_empty(_loss_shape(z, partials, reduction, embeddings))


@torch.library.custom_op("fusedvq::partials_mse_backward", mutates_args=())
def partials_mse_backward(grad: Tensor, z: Tensor, partials: Tensor, embeddings: Optional[Tensor], *,
                          reduction: int, gap_at: int, gap_width: int, use_triton: bool,
                          needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    mode = PartialsMode(reduction, gap_at, gap_width, use_triton)
    return _backward(grad, z, partials, mode, _needs(needs, embeddings), embeddings=embeddings)


@partials_mse_backward.register_fake
def _(grad, z, partials, embeddings, *, reduction, gap_at, gap_width, use_triton, needs):
    fresh = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    needs = _needs(needs, embeddings)
    return tuple(fresh(t) if need else _empty(z) for t, need in zip((z, partials, embeddings), needs))


def _needs(needs, embeddings: Optional[Tensor]) -> tuple[bool, bool, bool]:
    """(z, partials, embeddings): which gradients are wanted (never the embeddings' without embeddings)."""
    return bool(needs[0]), bool(needs[1]), embeddings is not None and len(needs) > 2 and bool(needs[2])


# ------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    z, partials, embeddings, mode = inputs
    ctx.save_for_backward(z, partials, *([] if embeddings is None else [embeddings]))
    ctx.mode = mode


def _definition_backward(ctx, grad, needs):
    """(grad_z, grad_partials, grad_embeddings), None where not wanted."""
    z, partials, *embedded = ctx.saved_tensors
    embeddings = embedded[0] if embedded else None
    needs = _needs(needs, embeddings)
    grads = ctx.ops.partials_mse_backward(grad, z, partials, embeddings, ctx.mode, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


# The backward op as ctx.ops reaches it (autograd.py): eagerly the gradient may live in the spare buffer.
IMPLEMENTATIONS.partials_mse_backward = lambda grad, z, partials, embeddings, mode, needs: _backward(
    grad, z, partials, mode, needs, True, embeddings)
REGISTERED.partials_mse_backward = lambda grad, z, partials, embeddings, mode, needs: partials_mse_backward(
    grad, z, partials, embeddings, **mode._asdict(), needs=list(needs))


def _composed(ctx):
    z, partials, *embedded = ctx.saved_tensors
    mode = ctx.mode

    def composed(z, partials, embeddings=None):
        return reference.partials_composed(z, partials, mode.reduction, mode.gap, embeddings)

    return composed, (z, partials, embedded[0] if embedded else None)


# (inputs: z, partials, the embeddings or None, the mode)
PARTIALS_MSE = OpAutograd("fusedvq::partials_mse_forward", _forward, _setup_context, _definition_backward,
                          _composed, grad_positions=(0, 1, 2), options=PartialsMode).register()
