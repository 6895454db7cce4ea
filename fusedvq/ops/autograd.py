"""How fusedvq's ops are defined and differentiated. Each op module (loss.py, clean.py, partials.py) states
an op once:

    define_op       registers fusedvq::<name> with its schema: tensors positional, options keyword-only by
                    name. The implementation takes the keyword-only arguments as named records (NamedTuples
                    whose fields are the schema's names, in order), passed last: implementation(*tensors,
                    *records). The op's entry in the two op tables (below) reaches it either way.
    OpAutograd      the autograd of one forward op: forward (its implementation), setup_context, backward
                    and composed; register() gives the op this autograd under torch.library.

It runs in two ways. Traced (torch.compile, export), the registered op's autograd runs OpAutograd's
setup_context and backward through the dispatcher. Eagerly, the routing point (ops/__init__.py) calls
EagerAutograd, a torch.autograd.Function that runs the same forward, setup_context and backward without
the dispatcher and its ~190 µs of schema parsing and dispatch per forward + backward. Either sets
`ctx.ops`: REGISTERED (traced) or IMPLEMENTATIONS (eager). A backward calls its backward op through that
table, ctx.ops.<name>(*tensors, *records), and the same line reaches the registered op when traced and
its implementation when eager; ctx.ops.eager tells a backward that what the forward saved is its call's
own, for what only an eager call may do (reuse a saved buffer). EagerAutograd's methods run on every
eager call, so they live beside the routing, in a file every call runs anyway: this module holds only
what runs when the ops are registered or traced.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from ..cpu import autocast_enabled, without_autocast


class OpTable(SimpleNamespace):
    """The ops by name (`masked_mse_backward`, ...), each called as op(*tensors, *records); `eager` says
    whether they are the implementations (run without the dispatcher) or the registered ops."""


IMPLEMENTATIONS = OpTable(eager=True)  # each op's implementation, as an eager call runs it
REGISTERED = OpTable(eager=False)  # each op through the dispatcher, its records passed as keyword arguments

# Truthy while a torch.func transform (grad, vmap, ...) runs: calls then take the plain composition. The C
# function itself: a Python wrapper would cost a frame on every call.
under_functorch = torch._C._functorch.peek_interpreter_stack


def define_op(name: str, schema: str, implementation: Callable, fake: Callable, records: tuple):
    """Register fusedvq::name with `schema` ("(Tensor x, ..., *, bool nan_to_num, ...) -> ..."), whose
    keyword-only arguments are the fields of `records`, in order: implementation and fake take (*tensors,
    *records). The registered op's implementation runs with autocast off (cpu.without_autocast), as a
    compiled graph run inside an autocast region would otherwise call it; IMPLEMENTATIONS.name and
    REGISTERED.name reach it. Returns the op (called with the options by name)."""

    def named(args: tuple) -> dict:  # the trailing records as keyword arguments
        return {field: value for record in args[len(args) - len(records):] for field, value in record._asdict().items()}

    def as_records(tensors: tuple, options: dict) -> tuple:
        return (*tensors, *(record(**{field: options[field] for field in record._fields}) for record in records))

    def dispatched(*tensors, **options):
        args = as_records(tensors, options)
        return without_autocast(implementation, *args) if autocast_enabled() else implementation(*args)

    op = torch.library.custom_op(f"fusedvq::{name}", dispatched, mutates_args=(), schema=schema)
    op.register_fake(lambda *tensors, **options: fake(*as_records(tensors, options)))
    setattr(IMPLEMENTATIONS, name, implementation)
    setattr(REGISTERED, name, lambda *args: op(*args[: len(args) - len(records)], **named(args)))
    return op


@dataclass(frozen=True)
class OpAutograd:
    """The autograd of one forward op, whose inputs are (*tensors, options record) as its implementation
    takes them:
        forward(*inputs) -> outputs       the implementation (outputs[0], or the one output, is the result;
                                          the rest are saved)
        setup_context(ctx, inputs, outputs)
        backward(ctx, grad, needs)        the gradients of the inputs at grad_positions, in that order
                                          (needs: which of them want one; None for the others), through
                                          ctx.ops
        composed(ctx) -> (fn, tensors)    fn(*tensors) the result as plain torch ops, for create_graph=True;
                                          tensors begin with the inputs at grad_positions
    grad_positions: the positions of the inputs with gradients (features, target, a hybrid's embeddings);
    options: the record type of the op's keyword-only arguments."""

    name: str
    forward: Callable
    setup_context: Callable
    backward: Callable
    composed: Callable
    grad_positions: tuple
    options: type

    def register(self) -> "OpAutograd":
        """Give the registered op this autograd (torch.library.register_autograd)."""
        torch.library.register_autograd(self.name, self._registered_backward, setup_context=self._registered_setup)
        return self

    def _registered_setup(self, ctx, inputs, keyword_only_inputs, output):
        self.setup_context(ctx, (*inputs, self.options(**keyword_only_inputs)), output)
        ctx.ops = REGISTERED
        # The registered backward returns a gradient per input in its structure: Nones for a list of tensors.
        ctx.no_grads = [[None] * len(a) if isinstance(a, (list, tuple)) else None for a in inputs]

    def _registered_backward(self, ctx, grad, *_unused_output_grads):
        positions = self.grad_positions
        grads = self.backward(ctx, grad, tuple(ctx.needs_input_grad[i] for i in positions))
        out = list(ctx.no_grads)
        for i, g in zip(positions, grads):
            out[i] = g
        return tuple(out)


def refuse_synced_higher_order(group: str, what: str) -> None:
    """Refuse `what` for norm="batch" with statistics over all ranks (group: their key; "" for none)."""
    if group:
        raise NotImplementedError(f'norm="batch" with sync_stats / process_group does not support {what}: the '
                                  f"statistics come from collectives over all ranks. Use sync_stats=False here")
