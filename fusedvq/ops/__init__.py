"""The routing point: every call of fusedvq's losses and cleaners passes through `call_loss` or `call_clean`
here, which check the call's tensors against its Plan (arguments.py; shapes, dtypes, devices: free, no
values read; checks.py says what is wrong), choose the implementation, and attach autograd:

    eager, CPU, small B               the plan's SmallRoute, first: its checks in one expression, then
                                      norm "none" / "stats": the plain composition of reference.py, whose
                                      autograd is C++; norm "batch": cpu/small.py's two autograd.Functions
    traced (torch.compile, export)    the registered op (loss.py, clean.py), which the tracer needs
    torch.func                        the plain composition of reference.py, differentiated by autograd
    eager otherwise                   the op's autograd Definition run by _Eager without the dispatcher:
                                      the same implementations, saved tensors and backward, without the
                                      ~190 µs of schema parsing and dispatch per forward+backward

A module keeps its Plan and SmallRoute between calls (held_plan), so that at B = 4 a call costs its checks,
a few µs of Python, and the composition's ops.

The implementation is chosen by the call's backend, not by the tensors' device alone: "auto" is Triton for
CUDA tensors (when triton imports) and the PyTorch path elsewhere, and both other pairings are real uses
— backend="reference" on CUDA, and the Triton kernels on CPU tensors under TRITON_INTERPRET=1, which is
how CI runs the kernels — so the op schemas carry use_triton in their integer `mode` list:
    mode = [nan_to_num, reduction, use_triton, gap_at, gap] (+ [needs_x, needs_target] for backwards)
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import reference
from ..cpu import autocast_enabled, without_autocast
from ..cpu import small as cpu_small
from ..kernels.plan import COMPUTE_DTYPE, NORM_BATCH, REDUCTION_COLUMN, Mode
from . import autocast, checks
from .checks import REFERENCE_DTYPES, TRITON_DTYPES, TRITON_INSTALLED, triton_importable  # noqa: F401
from .distributed import group_key
from .hybrid import check_embeddings
from ..strict import check_dense  # noqa: F401  (also ops.check_dense)

_STRIDED = torch.strided


def call_loss(features: Tensor, target: Tensor, plan, signature: str, route: Optional["SmallRoute"] = None,
              embeddings: Optional[Tensor] = None) -> Tensor:
    """The loss of features [B, D] against target [B, K (+ gap)] under `plan` (arguments.Plan); signature:
    the call in its right order, with {} for the two widths, to say when the arguments look swapped; route:
    the plan's small_route (None: the plan has none); embeddings [B, gap]: a hybrid's objective, one MSE
    over all K + gap target columns with the embeddings compared on the gap's (cpu/hybrid.py states it)."""
    if autocast.enabled() and autocast.active(features):  # F.mse_loss's behaviour (ops/autocast.py)
        return autocast.call(call_loss, (features, target), plan, signature, route, embeddings=embeddings)
    if route is not None and embeddings is None:
        loss = route.loss(features, target)
        if loss is not None:
            return loss
    if target is None:  # (check_pair's None is a cleaner's call)
        raise TypeError("target must be a torch.Tensor, got None")
    check_pair(features, target, allow_empty=_synced(plan))
    check_widths(features, target, plan, signature)
    if embeddings is not None or (plan.weight is not None and plan.weight.shape[0] != plan.columns.index.shape[0]):
        check_embeddings(embeddings, features, target, plan)
    use_triton, group, mode = _route(features, plan)
    weight = _weight_for(plan, features)
    columns, K, gap = [*plan.columns, *([] if weight is None else [weight])], plan.columns.index.shape[0], plan.gap
    eager = not torch.compiler.is_compiling()
    if plan.norm == NORM_BATCH:
        if not eager:
            return _op_loss.batch_mse_forward(features, target, columns, plan.eps, group, mode, embeddings)[0]
        if under_functorch() or (not use_triton and not group and features.device.type != "cpu"):
            refuse_synced_higher_order(group, "torch.func transforms")
            return reference.batch_mse_composed(features, target, columns[0], plan.eps, plan.nan_to_num,
                                                plan.reduction, gap, weight, embeddings)
        return _Eager.apply(_op_loss.BATCH_MSE, features, target, columns, plan.eps, group, mode, embeddings)
    stats = _stats_for(plan, features)
    if not eager:
        return _op_loss.masked_mse_forward(features, target, columns, stats, mode, embeddings)[0]
    if under_functorch() or (not use_triton and use_composed(features, K, gap[1] > 0)):
        shift, scale = stats if stats else (None, None)
        return reference.masked_mse_composed(features, target, columns[0], shift, scale, plan.nan_to_num,
                                             plan.reduction, gap, weight, embeddings)
    return _Eager.apply(_op_loss.MASKED_MSE, features, target, columns, stats, mode, embeddings)


def call_clean(features: Tensor, plan, route: Optional["SmallRoute"] = None) -> Tensor:
    """clean_features of features [B, D] under `plan`: z [B, K]. route: as in call_loss."""
    if autocast.enabled() and autocast.active(features):
        return autocast.call(call_clean, (features,), plan, route)
    if route is not None:
        z = route.clean(features)
        if z is not None:
            return z
    check_pair(features, None, allow_empty=_synced(plan))
    check_widths(features, None, plan)
    use_triton, group, mode = _route(features, plan)
    columns, K = list(plan.columns), plan.columns.index.shape[0]
    eager = not torch.compiler.is_compiling()
    if plan.norm == NORM_BATCH:
        if not eager:
            return _op_clean.batch_clean_forward(features, columns, plan.eps, group, mode)[0]
        if under_functorch() or (not use_triton and not group and features.device.type != "cpu"):
            refuse_synced_higher_order(group, "torch.func transforms")
            return reference.batch_clean_composed(features, columns[0], plan.eps, plan.nan_to_num)
        return _Eager.apply(_op_clean.BATCH_CLEAN, features, columns, plan.eps, group, mode)
    stats = _stats_for(plan, features)
    if not eager:
        return _op_clean.clean_forward(features, columns, stats, mode)
    if under_functorch() or (not use_triton and use_composed(features, K)):
        shift, scale = stats if stats else (None, None)
        return reference.clean_composed(features, columns[0], shift, scale, plan.nan_to_num)
    return _Eager.apply(_op_clean.CLEAN, features, columns, stats, mode)


class SmallRoute:
    """The small-batch route of one plan whose tensors live on the CPU: an eager CPU call at a small batch,
    recognized in one expression and run without the op machinery — norm "none" / "stats" by reference.py's
    composition (its few ops, autograd's C++ backward), norm "batch" by cpu/small.py. At B = 4 the separate
    checks, the routing and the registered op's machinery would cost a fifth of the step. Built once per
    plan (a module: when its buffers change); `loss` and `clean` answer None for any other call (a wrong one
    included), which then takes the full path, whose checks say what is wrong. Traced calls take the registered
    op, and calls under torch.func transforms the plain composition, on the full path."""

    __slots__ = ("plan", "width", "kept", "target_width", "dtypes", "min_rows", "batch", "gapped", "plain", "compose",
                 "args")

    def __init__(self, plan):
        self.plan, self.batch = plan, plan.norm == NORM_BATCH
        self.width, self.kept = plan.columns.inv_ptr.shape[0] - 1, plan.columns.index.shape[0]
        self.target_width, self.gapped = self.kept + plan.gap[1], plan.gap[1] > 0
        self.min_rows = 2 if self.batch else 1  # (norm="batch" needs two rows for its unbiased std)
        # The features' dtypes whose compute dtype is the statistics' and weights' (no cast per call); the
        # composition's common case (reference.masked_mse_plain) takes the compute dtypes themselves.
        fixed = {t.dtype for t in (plan.shift, plan.weight) if t is not None}
        self.plain = plain = not (self.batch or plan.nan_to_num or self.gapped or plan.weight is not None
                                  or plan.reduction == REDUCTION_COLUMN)
        self.dtypes = tuple(d for d in REFERENCE_DTYPES if (not fixed or {COMPUTE_DTYPE[d]} == fixed)
                            and (not plain or COMPUTE_DTYPE[d] == d))
        self.compose, self.args = (reference.masked_mse_plain, (plan.columns.index, plan.shift, plan.scale,
                                                                 plan.reduction)) if plain else (
            reference.masked_mse_composed, (plan.columns.index, plan.shift, plan.scale, plan.nan_to_num,
                                            plan.reduction, plan.gap, plan.weight))

    def loss(self, x: Tensor, r: Tensor) -> Optional[Tensor]:
        if (type(x) is Tensor and type(r) is Tensor and x.is_cpu and r.is_cpu and x.layout is _STRIDED
                and r.layout is _STRIDED and x.dtype in self.dtypes and r.dtype is x.dtype):
            try:
                xs, rs = x.shape, r.shape
            except RuntimeError:  # a nested tensor (the full path says so)
                return None
            if (len(xs) == 2 == len(rs) and xs[1] == self.width and rs[1] == self.target_width and rs[0] == xs[0]
                    and self.min_rows <= xs[0] and xs[0] * self.kept <= self.limit()
                    and not torch.compiler.is_compiling() and not under_functorch()):
                return cpu_small.loss(x, r, self.plan) if self.batch else self.compose(x, r, *self.args)
        return None

    def clean(self, x: Tensor) -> Optional[Tensor]:
        # (traced first: a traced mask's K is a size known on the device only, which the size checks would guard on)
        if (not torch.compiler.is_compiling() and type(x) is Tensor and x.is_cpu and x.layout is _STRIDED
                and not x.is_nested and x.dtype in self.dtypes and x.ndim == 2 and x.shape[1] == self.width
                and self.min_rows <= x.shape[0] and x.shape[0] * self.kept <= self.limit() and not under_functorch()):
            p = self.plan
            if self.batch:
                return cpu_small.clean(x, p)
            if self.plain:  # (x in the compute dtype, no nan_to_num)
                return reference.kept_plain(x, p.columns.index, p.shift, p.scale)
            return reference.clean_composed(x, p.columns.index, p.shift, p.scale, p.nan_to_num)
        return None

    def limit(self) -> int:
        """The most [B, K] elements this route takes (read per call: tests lower the limits)."""
        return cpu_small.SMALL_ELEMENTS if self.batch else (
            _GAP_COMPOSED_MAX_ELEMENTS if self.gapped else _COMPOSED_MAX_ELEMENTS)


def held_plan(module):
    """A fusedvq module's HeldPlan (loss.py: its plan with its buffers' tensors now, and its small_route), kept
    in module._held and rebuilt (module.hold()) only when a buffer was swapped or moved (functional_call,
    DataParallel replicas, .to()), as the buffers' identities tell: µs that count at B = 4."""
    b, held = module._buffers, module._held
    if held:
        index, shift, scale, weight, inv_ptr, inv_k = held.buffers
        if (b["index"] is index and b["shift"] is shift and b["scale"] is scale and b["weight"] is weight
                and b["inv_ptr"] is inv_ptr and b["inv_k"] is inv_k):
            return held
    return module.hold()


def small_route(plan) -> Optional[SmallRoute]:
    """The plan's SmallRoute, or None: tensors off the CPU, backend="triton", cross-rank statistics, or
    weights over a hybrid's K + c columns (its calls take embeddings, which the route does not)."""
    if (plan.backend == "triton" or _synced(plan) or not plan.columns.index.is_cpu
            or (plan.weight is not None and plan.weight.shape[0] != plan.columns.index.shape[0])):
        return None
    return SmallRoute(plan)


def _synced(plan) -> bool:
    return plan.sync[0] or plan.sync[1] is not None


def _route(features: Tensor, plan) -> tuple[bool, str, list]:
    """(use_triton, the statistics' group key, the op's mode list)."""
    if plan.columns.index.device != features.device:
        checks.device(features, plan)
    use_triton = use_triton_for(plan.backend, features)
    group = ""
    if plan.norm == NORM_BATCH and _synced(plan):
        group = group_key(plan.sync[1])
    elif plan.norm == NORM_BATCH and features.shape[0] < 2:
        checks.batch_rows(features)
    return use_triton, group, [int(plan.nan_to_num), plan.reduction, int(use_triton), *plan.gap]


def _stats_for(plan, features: Tensor) -> list:
    """[shift, scale] in the features' compute dtype (float64 features widen float32 statistics), or []."""
    if plan.shift is None:
        return []
    cdt = COMPUTE_DTYPE[features.dtype]
    if plan.shift.dtype != cdt:
        return [plan.shift.to(cdt), plan.scale.to(cdt)]
    return [plan.shift, plan.scale]


def _weight_for(plan, features: Tensor):
    """The loss's weights [K] in the features' compute dtype, or None."""
    w = plan.weight
    if w is None:
        return None
    cdt = COMPUTE_DTYPE[features.dtype]
    return w if w.dtype == cdt else w.to(cdt)


# norm "none" / "stats": up to this many [B, K] elements (1 MiB of fp32) the composition's few ops and C++
# backward win on the CPU; above it its batch-sized temporaries cost more than the blocked path (measured at
# K = 171: composed ahead at B = 1024 and 2048). A target with a gap (K = 143, c = 28): composed ahead at
# B = 256, blocked from 1024 on. (norm "batch" on the CPU takes no composition: its autograd graph is heavy,
# and small batches have cpu/small.py.)
_COMPOSED_MAX_ELEMENTS, _GAP_COMPOSED_MAX_ELEMENTS = 1 << 18, 1 << 16


def use_composed(x: Tensor, num_kept: int, gapped: bool = False) -> bool:
    """Whether an eager PyTorch-path call of norm "none" / "stats" takes reference.py's composition rather
    than cpu/'s blocked passes: on the CPU up to the limits above, always elsewhere (backend="reference" on
    CUDA)."""
    limit = min(_COMPOSED_MAX_ELEMENTS, _GAP_COMPOSED_MAX_ELEMENTS) if gapped else _COMPOSED_MAX_ELEMENTS
    return x.device.type != "cpu" or x.shape[0] * num_kept <= limit


def under_functorch() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running: calls then take the plain composition."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def use_triton_for(backend: str, features: Tensor) -> bool:
    """Resolve backend ("auto", "triton", "reference") for these features; errors say why Triton can't run."""
    if backend == "auto":
        return features.is_cuda and features.dtype in TRITON_DTYPES and TRITON_INSTALLED
    if backend == "reference" and features.dtype in REFERENCE_DTYPES:
        return False
    if (backend == "triton" and features.dtype in TRITON_DTYPES and TRITON_INSTALLED
            and (features.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")):
        return True
    raise checks.backend_error(backend, features)


# ---------------------------------------------------------------------------------------------------
# The checks of a call's tensors: free (no values read, no host synchronization), each in one expression;
# what is wrong, checks.py says with the numbers
# ---------------------------------------------------------------------------------------------------


def check_pair(features: Tensor, target: Optional[Tensor], allow_empty: bool = False) -> None:
    """Types, layouts, ranks, dtypes, devices and batch sizes of x [B, D] and r [B, K] (target None: x alone).
    B = 0 only if allowed: a rank without rows still takes part in cross-rank statistics."""
    if (type(features) is Tensor and not features.is_nested and features.layout == _STRIDED and features.dim() == 2
            and features.is_floating_point() and features.shape[0] and features.device.type != "meta"
            and (target is None or (type(target) is Tensor and not target.is_nested and target.layout == _STRIDED
                                    and target.dim() == 2 and target.dtype == features.dtype
                                    and target.shape[0] == features.shape[0] and target.device == features.device))):
        return  # the common case, in one expression (µs count at B = 4); what is wrong, checks.py says
    checks.pair(features, target, allow_empty)


def check_order(first: Tensor, second: Optional[Tensor], want_first: int, want_second: int, signature: str) -> None:
    """Refuse a pair given the other way round (as in F.mse_loss(recon, features)): `first` has the width
    `second` should have and the other way round. signature: the right order, with {} for the widths."""
    if second is None or want_first == want_second or first.dim() != 2 or second.dim() != 2:
        return
    if (first.shape[1], second.shape[1]) == (want_second, want_first):
        checks.swapped(first, second, signature.format(want_first, want_second))


def check_widths(features: Tensor, target: Optional[Tensor], plan, signature: Optional[str] = None) -> None:
    """x has the D columns the plan was built for, and r (when given) its K kept ones plus the gap's columns."""
    D, K = plan.columns.inv_ptr.shape[0] - 1, plan.columns.index.shape[0]
    if features.shape[1] == D and (target is None or target.shape[1] == K + plan.gap[1]):
        return
    if signature is not None:
        check_order(features, target, D, K + plan.gap[1], signature)
    checks.widths(features, target, plan)


# ---------------------------------------------------------------------------------------------------
# One autograd definition per op, registered once and run eagerly by _Eager
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Definition:
    """The autograd of one forward op: forward(*inputs) -> outputs (outputs[0], or the one output, is the
    result; the rest are saved); setup_context(ctx, inputs, outputs); backward(ctx, grad, needs, eager) -> the
    gradients of all inputs (needs: which of the `differentiable` leading inputs want one; eager: called by
    _Eager, whose ctx is private to one call); composed(ctx) -> (fn, tensors) with fn(*tensors) the result as
    plain torch ops, for create_graph=True."""

    name: str
    forward: Callable
    setup_context: Callable
    backward: Callable
    composed: Callable
    differentiable: int  # leading inputs with gradients: 2 (features, target) or 1 (features)
    later: tuple = ()  # positions of later inputs with gradients (the hybrid's optional embeddings, last)

    def grad_positions(self, num_inputs: int) -> tuple:
        """The positions of the inputs with gradients, of a call with num_inputs inputs."""
        return (*range(self.differentiable), *(i for i in self.later if i < num_inputs))

    def register(self) -> "Definition":
        torch.library.register_autograd(self.name, self._registered_backward, setup_context=self._registered_setup)
        return self

    def _registered_setup(self, ctx, inputs, output):
        self.setup_context(ctx, inputs, output)
        # The registered backward returns a gradient per input in its structure: Nones for a list of tensors.
        ctx.no_grads = tuple([None] * len(a) if isinstance(a, (list, tuple)) and all(
            isinstance(t, Tensor) for t in a) else None for a in inputs[self.differentiable :])

    def _registered_backward(self, ctx, grad, *_unused_output_grads):
        positions = self.grad_positions(len(ctx.needs_input_grad))
        grads = self.backward(ctx, grad, tuple(ctx.needs_input_grad[i] for i in positions), False)
        # (as many as the call gave: the dispatcher drops trailing arguments equal to their defaults)
        out = [*grads[: self.differentiable], *ctx.no_grads][: len(ctx.needs_input_grad)]
        for i in positions[self.differentiable :]:
            out[i] = grads[i] if i < len(grads) else None
        return tuple(out)


class _Eager(torch.autograd.Function):
    """An op's Definition, run eagerly: forward = its implementation and setup_context, backward = its
    backward (or, with create_graph=True, its composition's autograd)."""

    @staticmethod
    def forward(ctx, definition: Definition, *inputs):
        outputs = definition.forward(*inputs)
        definition.setup_context(ctx, inputs, outputs)
        ctx.definition = definition
        return outputs[0] if isinstance(outputs, tuple) else outputs

    @staticmethod
    def backward(ctx, grad):
        definition = ctx.definition
        num_inputs = len(ctx.needs_input_grad) - 1
        positions = definition.grad_positions(num_inputs)
        needs = tuple(ctx.needs_input_grad[1 + i] for i in positions)
        if torch.is_grad_enabled():  # create_graph=True: the composition's own, differentiable gradients
            fn, tensors = definition.composed(ctx)
            grads = reference.grads_through(fn(*tensors), tensors[: len(positions)], needs, grad)
        else:
            every = definition.backward(ctx, grad, needs, True)
            grads = [every[i] if i < len(every) else None for i in positions]
        out = [None] * num_inputs
        for i, g in zip(positions, grads):
            out[i] = g
        return (None, *out)


def refuse_synced_higher_order(group: str, what: str) -> None:
    if group:
        raise NotImplementedError(f'norm="batch" with sync_stats / process_group does not support {what}: the '
                                  f"statistics come from collectives over all ranks. Use sync_stats=False here")


def kernels():
    """fusedvq.kernels' entry points (imported on first use: they import triton; looked up once)."""
    global _kernels
    if _kernels is None:
        from .. import kernels as module

        _kernels = module
    return _kernels


_kernels = None


def autocast_off(fn):
    """fn run with autocast off (cpu.without_autocast) where it is on; outside autocast, one C call. Here, beside the
    routing, rather than in cpu/ or an op module, so that an eager call of either op runs no extra file for it."""

    @functools.wraps(fn)
    def run(*args):
        return without_autocast(fn, *args) if autocast_enabled() else fn(*args)

    # Its annotations resolved: torch.library infers the registered ops' schemas from a wrapped body's signature.
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run


def kernel_mode(mode: list, norm: int = 0, needs=(True, True)) -> Mode:
    """The kernels' and the CPU paths' Mode of an op's mode list."""
    return Mode(norm, bool(mode[0]), mode[1], (mode[3], mode[4]), needs)


from . import clean as _op_clean  # noqa: E402  (the op modules build on the Definition above)
from . import loss as _op_loss  # noqa: E402
