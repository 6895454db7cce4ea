"""One op's autograd, defined once: what its forward saves, how its backward runs, and the differentiable
composition a backward with create_graph=True runs instead. register() attaches it to the registered
forward op (torch.library.register_autograd); calls.py's eager path runs the very same definition without
the dispatcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

_kernels_module = None


def kernels():
    """fusedvq.kernels, imported on first use (it imports triton: only the Triton path needs it)."""
    global _kernels_module
    if _kernels_module is None:
        from .. import kernels

        _kernels_module = kernels
    return _kernels_module


def empty(like: Tensor, dtype=None) -> Tensor:
    """A 0-element placeholder output (what an implementation does not produce)."""
    return like.new_empty(0, dtype=dtype)


def fresh_like(t: Tensor) -> Tensor:
    """The fake of a gradient: a new contiguous tensor shaped like t."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def merge_fn(group: str, eps: float):
    """The cross-rank statistics merge of process-group key `group` ("" for this batch's own: None)."""
    if not group:
        return None
    from .. import distributed

    return distributed.merged_stats_fn(group, eps)


def sum_fn(group: str):
    """The cross-rank sum of the backward's column sums for `group` ("" for this batch's own: None)."""
    if not group:
        return None
    from .. import distributed

    return distributed.sum_over_ranks_fn(group)


def refuse_synced_higher_order(group: str, what: str) -> None:
    if group:
        raise NotImplementedError(
            f'norm="batch" with sync_stats / process_group does not support {what}: the statistics come from '
            f"collectives over all ranks. Use sync_stats=False for this computation"
        )


@dataclass(frozen=True)
class Definition:
    """The autograd of one forward op.

    forward(*inputs) -> outputs        the forward op's implementation; outputs[0] (or the one output) is
                                       the result, the rest are saved for the backward
    setup_context(ctx, inputs, outputs)  ctx.save_for_backward(...) and the non-tensor options
    backward(ctx, grad, needs, eager)  the gradients of all inputs; needs = which of the `differentiable`
                                       leading inputs want one; eager: called by calls.py, whose ctx is
                                       private to one call (an implementation may then reuse saved buffers)
    composed(ctx) -> (fn, tensors)     fn(*tensors) = the result as plain torch ops, for create_graph=True
    """

    name: str
    forward: Callable
    setup_context: Callable
    backward: Callable
    composed: Callable
    differentiable: int  # leading inputs with gradients: 2 (features, target) or 1 (features)

    def register(self) -> "Definition":
        torch.library.register_autograd(self.name, self._registered_backward, setup_context=self.setup_context)
        return self

    def _registered_backward(self, ctx, grad, *_unused_output_grads):
        return self.backward(ctx, grad, tuple(ctx.needs_input_grad[: self.differentiable]), False)


def grads_with_graph(fn, tensors: tuple, grad: Tensor, needs: tuple) -> tuple:
    """The gradients of fn(*tensors) for a backward run with create_graph=True: the composition's own
    autograd, so that they are themselves differentiable (double backward, gradient penalties) and exact
    to any order; None where not needed."""
    inputs = [t for t, need in zip(tensors, needs) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(fn(*tensors), inputs, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)
