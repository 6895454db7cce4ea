"""How a call reaches the registered ops (arguments already canonical and valid, from functional.py,
module.py and clean.py), with autograd attached.

Traced (torch.compile, torch.export), a call is the registered op of ops/, which the tracer needs. Eager,
the op's dispatch (schema parsing, the dispatcher, the generated autograd node) would cost about 190 µs
per forward+backward on a 2-core CPU: more than the whole loss of a small batch, and on a GPU host the
difference between a fused step and an unfused one at B = 4. Eager calls therefore run the op's own
autograd definition (ops/definition.py) through _Eager, one torch.autograd.Function for every op: the same
implementations, the same saved tensors, the same backward, without the dispatcher. Two eager cases take
the plain composition of reference.py instead, which autograd differentiates like any torch code:
    - torch.func transforms (grad, vmap, ...), and a backward with create_graph=True (double backward);
    - the CPU path at small B (cpu.use_composed): autograd's C++ backward has the least per-op overhead
      there (norm "stats" at B = 4: 60 µs against 130 µs a step).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu, reference
from .columns import ColumnMap
from .ops import BATCH_CLEAN, BATCH_MSE, CLEAN, MASKED_MSE
from .ops.clean import batch_clean_forward, clean_forward
from .ops.definition import Definition, grads_with_graph, refuse_synced_higher_order
from .ops.loss import batch_mse_forward, masked_mse_forward


class _Eager(torch.autograd.Function):
    """An op's autograd definition, run eagerly: forward = the op's implementation and setup_context,
    backward = the definition's backward (or, with create_graph=True, its composition's autograd)."""

    @staticmethod
    def forward(ctx, definition: Definition, *inputs):
        outputs = definition.forward(*inputs)
        definition.setup_context(ctx, inputs, outputs)
        ctx.definition = definition
        return outputs[0] if isinstance(outputs, tuple) else outputs

    @staticmethod
    def backward(ctx, grad):
        definition = ctx.definition
        needs = tuple(ctx.needs_input_grad[1 : 1 + definition.differentiable])
        if torch.is_grad_enabled():  # create_graph=True
            fn, tensors = definition.composed(ctx)
            grads = grads_with_graph(fn, tensors, grad, needs)
            rest = len(ctx.needs_input_grad) - 1 - definition.differentiable
            return (None, *grads) + (None,) * rest
        return (None, *definition.backward(ctx, grad, needs, True))


def under_functorch() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running: calls then take the plain
    composition, which those transforms differentiate and batch like any torch code."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def masked_mse_op(
    x: Tensor,  # [B, D]
    target: Tensor,  # [B, K]
    columns: ColumnMap,
    shift: Optional[Tensor],  # [K] compute dtype, or None
    scale: Optional[Tensor],  # [K] compute dtype, or None
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
    gap: tuple[int, int] = (0, 0),  # target [B, K + c]: its c columns from `at` on are skipped
) -> Tensor:
    """The loss of norm "none"/"stats" with autograd attached."""
    inputs = (x, target, columns.index, columns.inv_ptr, columns.inv_k, shift, scale, nan_to_num, reduction,
              use_triton, *gap)
    if not _eager():
        return masked_mse_forward(*inputs)[0]
    if under_functorch() or (not use_triton and cpu.use_composed(x, columns.num_kept, gapped=gap[1] > 0)):
        return reference.masked_mse_composed(x, target, columns.index, shift, scale, nan_to_num, reduction, *gap)
    return _Eager.apply(MASKED_MSE, *inputs)


def batch_mse_op(
    x: Tensor,  # [B, D]
    target: Tensor,  # [B, K]
    columns: ColumnMap,
    eps: float,
    nan_to_num: bool,
    reduction: int,
    use_triton: bool,
    group: str = "",
    gap: tuple[int, int] = (0, 0),  # as in masked_mse_op
) -> Tensor:
    """The loss of norm "batch" with autograd attached."""
    inputs = (x, target, columns.index, columns.inv_ptr, columns.inv_k, eps, nan_to_num, reduction, use_triton,
              group, *gap)
    if not _eager():
        return batch_mse_forward(*inputs)[0]
    if under_functorch() or (not use_triton and not group and
                             cpu.use_composed(x, columns.num_kept, batch=True, gapped=gap[1] > 0)):
        refuse_synced_higher_order(group, "torch.func transforms")
        return reference.batch_mse_composed(x, target, columns.index, eps, nan_to_num, reduction, *gap)
    return _Eager.apply(BATCH_MSE, *inputs)


def clean_op(
    x: Tensor,  # [B, D]
    columns: ColumnMap,
    shift: Optional[Tensor],  # [K] compute dtype, or None
    scale: Optional[Tensor],  # [K] compute dtype, or None
    nan_to_num: bool,
    use_triton: bool,
) -> Tensor:
    """clean_features of norm "none"/"stats" with autograd attached: z [B, K]."""
    inputs = (x, columns.index, columns.inv_ptr, columns.inv_k, shift, scale, nan_to_num, use_triton)
    if not _eager():
        return clean_forward(*inputs)
    if under_functorch() or (not use_triton and cpu.use_composed(x, columns.num_kept)):
        return reference.clean_composed(x, columns.index, shift, scale, nan_to_num)
    return _Eager.apply(CLEAN, *inputs)


def batch_clean_op(
    x: Tensor,  # [B, D]
    columns: ColumnMap,
    eps: float,
    nan_to_num: bool,
    use_triton: bool,
    group: str = "",
) -> Tensor:
    """clean_features of norm "batch" with autograd attached: z [B, K]."""
    inputs = (x, columns.index, columns.inv_ptr, columns.inv_k, eps, nan_to_num, use_triton, group)
    if not _eager():
        return batch_clean_forward(*inputs)[0]
    if under_functorch() or (not use_triton and not group and cpu.use_composed(x, columns.num_kept, batch=True)):
        refuse_synced_higher_order(group, "torch.func transforms")
        return reference.batch_clean_composed(x, columns.index, eps, nan_to_num)
    return _Eager.apply(BATCH_CLEAN, *inputs)
