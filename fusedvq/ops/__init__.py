"""The routing point: every call of fusedvq's losses and cleaners passes through `call_loss` or `call_clean`
here, which check the call's tensors against its Plan (arguments.py; shapes, dtypes, devices: free, no
values read; checks.py says what is wrong), choose the implementation, and attach autograd:

    eager, CPU, small B               the plan's SmallRoute, first: its checks in one expression, then
                                      norm "none" / "stats": the plain composition of reference.py, whose
                                      autograd is C++; norm "batch": cpu/small.py's two autograd.Functions
    traced (torch.compile, export)    the registered op (loss.py, clean.py), which the tracer needs
    torch.func                        the plain composition of reference.py, differentiated by autograd
    eager otherwise                   the op's OpAutograd (autograd.py) run by EagerAutograd without the
                                      dispatcher: the same implementations, saved tensors and backward

A module keeps its Plan and SmallRoute between calls (held_plan). The backend, not the tensors' device
alone, picks the implementation (backend="reference" runs on CUDA too, the kernels on CPU tensors under
TRITON_INTERPRET=1), so the op schemas take use_triton, by name as every option: tensors positional, then
keyword-only options (loss.py and clean.py list them; their records LossOptions and CleanOptions carry them).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..cpu import autocast_enabled, without_autocast
from ..cpu import small as cpu_small
from ..kernels.plan import COMPUTE_DTYPE, NORM_BATCH, REDUCTION_COLUMN
from ..strict import check_dense  # noqa: F401  (also ops.check_dense)
from . import autocast, checks
from . import clean as clean_ops
from . import loss as loss_ops
from .autograd import IMPLEMENTATIONS, refuse_synced_higher_order, under_functorch
from .checks import REFERENCE_DTYPES, TRITON_DTYPES, TRITON_INSTALLED, triton_importable  # noqa: F401
from .distributed import group_key
from .hybrid import check_embeddings

_STRIDED = torch.strided


def call_loss(features: Tensor, target: Tensor, plan, signature: str, route: Optional["SmallRoute"] = None,
              embeddings: Optional[Tensor] = None) -> Tensor:
    """The loss of features [B, D] against target [B, K (+ gap)] under `plan` (arguments.Plan). signature: the
    call in its right order, {} for the two widths (said when they look swapped); route: the plan's small_route
    or None; embeddings [B, gap]: a hybrid's objective over all K + gap columns (cpu/hybrid.py states it)."""
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
    use_triton, group = _route(features, plan)
    options = loss_ops.LossOptions(plan.nan_to_num, plan.reduction, use_triton, *plan.gap)
    weight, columns, index = _weight_for(plan, features), [*plan.columns], plan.columns.index
    if plan.norm == NORM_BATCH:
        inputs = (features, target, columns, plan.eps, group, weight, embeddings)
        if torch.compiler.is_compiling():
            return loss_ops.batch_mse_forward(*inputs, **options._asdict())[0]
        if under_functorch() or (not use_triton and not group and features.device.type != "cpu"):
            refuse_synced_higher_order(group, "torch.func transforms")
            return reference.batch_mse_composed(features, target, index, plan.eps, plan.nan_to_num, plan.reduction,
                                                plan.gap, weight, embeddings)
        return EagerAutograd.apply(loss_ops.BATCH_MSE, *inputs, options)
    inputs = (features, target, columns, _affine_for(plan, features), weight, embeddings)
    if torch.compiler.is_compiling():
        return loss_ops.masked_mse_forward(*inputs, **options._asdict())[0]
    if under_functorch() or (not use_triton and use_composed(features, index.shape[0], plan.gap.width > 0)):
        shift, scale = inputs[3] or (None, None)
        return reference.masked_mse_composed(features, target, index, shift, scale, plan.nan_to_num, plan.reduction,
                                             plan.gap, weight, embeddings)
    return EagerAutograd.apply(loss_ops.MASKED_MSE, *inputs, options)


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
    use_triton, group = _route(features, plan)
    options, columns, index = clean_ops.CleanOptions(plan.nan_to_num, use_triton), [*plan.columns], plan.columns.index
    if plan.norm == NORM_BATCH:
        if torch.compiler.is_compiling():
            return clean_ops.batch_clean_forward(features, columns, plan.eps, group, **options._asdict())[0]
        if under_functorch() or (not use_triton and not group and features.device.type != "cpu"):
            refuse_synced_higher_order(group, "torch.func transforms")
            return reference.batch_clean_composed(features, index, plan.eps, plan.nan_to_num)
        return EagerAutograd.apply(clean_ops.BATCH_CLEAN, features, columns, plan.eps, group, options)
    affine = _affine_for(plan, features)
    if torch.compiler.is_compiling():
        return clean_ops.clean_forward(features, columns, affine, **options._asdict())
    if under_functorch() or (not use_triton and use_composed(features, index.shape[0])):
        shift, scale = affine or (None, None)
        return reference.clean_composed(features, index, shift, scale, plan.nan_to_num)
    return EagerAutograd.apply(clean_ops.CLEAN, features, columns, affine, options)


class EagerAutograd(torch.autograd.Function):
    """An op's OpAutograd (autograd.py) without the dispatcher's ~190 µs: its implementation, setup_context
    and backward with ctx.ops = IMPLEMENTATIONS (create_graph=True: its composition's autograd), autocast
    off as for the registered ops. Beside the routing: every eager call runs it."""

    @staticmethod
    def forward(ctx, op, *inputs):
        outputs = without_autocast(op.forward, *inputs) if autocast_enabled() else op.forward(*inputs)
        op.setup_context(ctx, inputs, outputs)
        ctx.op, ctx.ops = op, IMPLEMENTATIONS
        return outputs[0] if isinstance(outputs, tuple) else outputs

    @staticmethod
    def backward(ctx, grad):
        op, positions = ctx.op, ctx.op.grad_positions
        needs = tuple(ctx.needs_input_grad[1 + i] for i in positions)
        if torch.is_grad_enabled():  # create_graph=True: the composition's own, differentiable gradients
            fn, tensors = op.composed(ctx)
            grads = reference.grads_through(fn(*tensors), tensors[: len(positions)], needs, grad)
        elif autocast_enabled():
            grads = without_autocast(op.backward, ctx, grad, needs)
        else:
            grads = op.backward(ctx, grad, needs)
        out = [None] * len(ctx.needs_input_grad)
        for i, g in zip(positions, grads):
            out[1 + i] = g
        return tuple(out)


class SmallRoute:
    """The small-batch route of a plan on the CPU: an eager call at a small batch, recognized in one expression
    and run without the op machinery (a fifth of a B = 4 step) by reference.py's composition (norm "none" /
    "stats") or cpu/small.py ("batch"). Built once per plan; `loss` and `clean` answer None for any other call
    (a wrong, traced or torch.func one included), which then takes the full path."""

    __slots__ = ("plan", "width", "kept", "target_width", "dtypes", "min_rows", "batch", "gapped", "plain", "compose",
                 "args")

    def __init__(self, plan):
        self.plan, self.batch = plan, plan.norm == NORM_BATCH
        self.width, self.kept = plan.columns.inv_ptr.shape[0] - 1, plan.columns.index.shape[0]
        self.target_width, self.gapped = self.kept + plan.gap.width, plan.gap.width > 0
        self.min_rows = 2 if self.batch else 1  # (norm="batch" needs two rows for its unbiased std)
        # The dtypes computing in the statistics' and weights' dtype (no cast per call); masked_mse_plain: their own.
        fixed = {t.dtype for t in (plan.shift, plan.weight) if t is not None}
        self.plain = plain = not (self.batch or plan.nan_to_num or self.gapped or plan.weight is not None
                                  or plan.reduction == REDUCTION_COLUMN)
        self.dtypes = tuple(d for d in REFERENCE_DTYPES if (not fixed or {COMPUTE_DTYPE[d]} == fixed)
                            and (not plain or COMPUTE_DTYPE[d] == d))
        self.compose, self.args = (cpu_small.masked_mse_plain, (plan.columns.index, plan.shift, plan.scale,
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
            return (cpu_small.kept_plain(x, p.columns.index, p.shift, p.scale) if self.plain  # (no nan_to_num)
                    else reference.clean_composed(x, p.columns.index, p.shift, p.scale, p.nan_to_num))
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


def _route(features: Tensor, plan) -> tuple[bool, str]:
    """(use_triton, the statistics' group key: "" for this batch's own)."""
    if plan.columns.index.device != features.device:
        checks.device(features, plan)
    use_triton = use_triton_for(plan.backend, features)
    if plan.norm == NORM_BATCH and _synced(plan):
        return use_triton, group_key(plan.sync[1])
    if plan.norm == NORM_BATCH and features.shape[0] < 2:
        checks.batch_rows(features)
    return use_triton, ""


def _affine_for(plan, features: Tensor) -> list:
    """[shift, scale] in the features' compute dtype (float64 features widen float32 statistics), or []."""
    if plan.shift is None:
        return []
    cdt = COMPUTE_DTYPE[features.dtype]
    return [plan.shift, plan.scale] if plan.shift.dtype == cdt else [plan.shift.to(cdt), plan.scale.to(cdt)]


def _weight_for(plan, features: Tensor):
    """The loss's weights [K] in the features' compute dtype, or None."""
    w = plan.weight
    return w if w is None or w.dtype == COMPUTE_DTYPE[features.dtype] else w.to(COMPUTE_DTYPE[features.dtype])


# norm "none" / "stats" on the CPU: up to this many [B, K] elements (1 MiB of fp32) the composition beats the
# blocked path (measured at K = 171 up to B = 2048; with a gap, K = 143, c = 28: B = 256, not 1024).
_COMPOSED_MAX_ELEMENTS, _GAP_COMPOSED_MAX_ELEMENTS = 1 << 18, 1 << 16


def use_composed(x: Tensor, num_kept: int, gapped: bool = False) -> bool:
    """Whether an eager PyTorch-path call of norm "none" / "stats" takes reference.py's composition, not cpu/'s
    blocked passes: on the CPU up to the limits above, always elsewhere (backend="reference" on CUDA)."""
    limit = min(_COMPOSED_MAX_ELEMENTS, _GAP_COMPOSED_MAX_ELEMENTS) if gapped else _COMPOSED_MAX_ELEMENTS
    return x.device.type != "cpu" or x.shape[0] * num_kept <= limit


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
    if features.shape[1] == D and (target is None or target.shape[1] == K + plan.gap.width):
        return
    if signature is not None:
        check_order(features, target, D, K + plan.gap.width, signature)
    checks.widths(features, target, plan)
