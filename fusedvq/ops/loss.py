"""The loss as registered ops: norm "none" / "stats" and norm "batch", each a forward and a backward op with
one OpAutograd (autograd.py; the routing point, ops/__init__.py, runs it eagerly). Tensors are positional,
the options keyword-only:

    fusedvq::masked_mse_forward(Tensor x, Tensor target, Tensor[] columns, Tensor[] affine, Tensor? weight,
        Tensor? embeddings, *, bool nan_to_num, int reduction, bool use_triton, int gap_at, int gap_width)
        -> (loss, diff, finite)
    fusedvq::masked_mse_backward(Tensor grad, Tensor x, Tensor target, Tensor[] columns, Tensor[] affine,
        Tensor[] saved, Tensor? weight, Tensor? embeddings, *, <the forward's options>, bool needs_x,
        bool needs_target, bool needs_embeddings) -> (grad_x, grad_target, grad_embeddings)
    fusedvq::batch_mse_forward(Tensor x, Tensor target, Tensor[] columns, float eps, str group, Tensor? weight,
        Tensor? embeddings, *, <options>) -> (loss, moments [5, K], colsums)
    fusedvq::batch_mse_backward(Tensor grad, Tensor x, Tensor target, Tensor[] columns, Tensor[] saved,
        str group, Tensor? weight, Tensor? embeddings, *, <options>, <needs>) -> (grad_x, grad_target,
        grad_embeddings)

columns = [index [K] int64, inv_ptr [D+1] int32, inv_k [K] int32] (kernels/plan.py's ColumnMap: inputs, so
that autograd saves them for the backward, which writes grad_x as a gather through the inverse); affine =
[] (norm "none") or [μ, 1/σ] [K] in the compute dtype; weight: the per-column weights [K] in the compute
dtype, or None. The options (LossOptions): nan_to_num, reduction (a REDUCTION_* code), use_triton (the
kernels, else the CPU implementations; on the kernels the forward takes TUNING.forward_loads' loads), and
the target's gap: the target is [B, K + gap_width], its columns gap_at .. gap_at + gap_width − 1 (a
hybrid's embedding columns) skipped, read and written in place. The backward's needs (LossNeeds): the
gradients wanted (one not wanted is neither computed nor written: a 0-element placeholder comes back).
embeddings [B, gap_width] (optional): a hybrid's objective instead, one MSE over all K + gap_width target
columns (loss [K + gap_width] / [B, K + gap_width] for reductions column / none, weight [K + gap_width]).

saved: norm "none"/"stats" [diff, finite] — the CPU path keeps diff [B, K] (and the finite mask with
nan_to_num) to avoid a second gather, the kernels recompute z and return both empty; norm "batch"
[moments [5, K], colsums [2, K] ([0, K] for reduction "none")]. group: "" for this batch's own statistics,
else a key from ops/distributed.py (all ranks' rows).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import kernels, reference
from ..cpu import batch as cpu_batch, blocked as cpu_blocked, hybrid as cpu_hybrid
from ..kernels.plan import COMPUTE_DTYPE, NORM_BATCH, NORM_NONE, NORM_STATS, REDUCTION_COLUMN, REDUCTION_NONE, Gap, Mode
from .autograd import OpAutograd, define_op, refuse_synced_higher_order
from .distributed import merged_moments_fn, sum_over_ranks_fn


class LossOptions(NamedTuple):
    """The loss ops' keyword-only options, as one record (the schemas name each field)."""

    nan_to_num: bool
    reduction: int  # REDUCTION_* (kernels/plan.py)
    use_triton: bool  # the kernels (kernels/), else the CPU implementations (cpu/)
    gap_at: int  # the target's first skipped (embedding) column
    gap_width: int  # how many columns the gap skips; 0: none
    gap = property(lambda self: Gap(self.gap_at, self.gap_width))  # (the two as the record the others take)

    def mode(self, norm: int = NORM_NONE, needs: tuple = (True, True)) -> Mode:
        """The kernels' and the CPU implementations' Mode of these options."""
        return Mode(norm, self.nan_to_num, self.reduction, self.gap, needs)


class LossNeeds(NamedTuple):
    """The gradients a backward op computes (its keyword-only needs_*)."""

    needs_x: bool
    needs_target: bool
    needs_embeddings: bool


_OPTIONS = "*, bool nan_to_num, int reduction, bool use_triton, int gap_at, int gap_width"
_NEEDS = "bool needs_x, bool needs_target, bool needs_embeddings"
_GRADS = "-> (Tensor, Tensor, Tensor)"


def empty(like: Tensor, dtype=None) -> Tensor:
    """A 0-element placeholder output (what an implementation does not produce)."""
    return like.new_empty(0, dtype=dtype)


def _fresh(like: Tensor) -> Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _loss_shape(x: Tensor, index: Tensor, options: LossOptions, embeddings=None) -> tuple[int, ...]:
    width, reduction = index.shape[0] + (options.gap_width if embeddings is not None else 0), options.reduction
    return (x.shape[0], width) if reduction == REDUCTION_NONE else (width,) if reduction == REDUCTION_COLUMN else ()


def _grads(grads, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An implementation's (grad_x, grad_target[, grad_embeddings]), None where not wanted, as the backward
    op's three outputs (0-element where not wanted)."""
    gx, gt, *ge = grads
    return (empty(x) if gx is None else gx, empty(target) if gt is None else gt,
            empty(x) if not ge or ge[0] is None else ge[0])


def _grads_fake(x: Tensor, target: Tensor, embeddings, needs: LossNeeds) -> tuple:
    return (_fresh(x) if needs.needs_x else empty(x), _fresh(target) if needs.needs_target else empty(target),
            _fresh(embeddings) if needs.needs_embeddings else empty(x))


def _wanted(grads, needs: tuple) -> tuple:
    """The backward op's (grad_x, grad_target, grad_embeddings) as OpAutograd.backward returns them."""
    return tuple(g if need else None for g, need in zip(grads, needs))


# ------------------------------------------------------------------------------ norm "none" / "stats"


def _masked_mse_forward(x: Tensor, target: Tensor, columns: list, affine: list, weight: Optional[Tensor],
                        embeddings: Optional[Tensor], options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    if options.use_triton:
        mode = options.mode(NORM_STATS if affine else NORM_NONE)
        rows = embeddings is None and kernels.TUNING.forward_loads == "rows"  # the whole-row candidate
        if rows and kernels.rows_fit(x, target):
            loss = kernels.rows_forward(x, target, columns[0], tuple(affine), mode, weight)
        else:
            loss = kernels.masked_mse_forward(x, target, columns[0], tuple(affine), mode, weight, embeddings)
        return loss, empty(x), empty(x, torch.bool)

    def features(w):
        loss, diff, finite = cpu_blocked.masked_mse_forward(x, target, columns[0], tuple(affine), options.mode(), w)
        return loss, diff, finite if finite is not None else empty(x, torch.bool)

    if embeddings is None:
        return features(weight)
    return cpu_hybrid.forward(features, target, embeddings, options.mode(), weight)


def _masked_mse_forward_fake(x, target, columns, affine, weight, embeddings, options):
    loss = x.new_empty(_loss_shape(x, columns[0], options, embeddings))
    if options.use_triton:
        return loss, empty(x), empty(x, torch.bool)
    diff = x.new_empty((x.shape[0], columns[0].shape[0]), dtype=COMPUTE_DTYPE[x.dtype])
    return loss, diff, diff.new_empty(diff.shape if options.nan_to_num else (0,), dtype=torch.bool)


masked_mse_forward = define_op(
    "masked_mse_forward", "(Tensor x, Tensor target, Tensor[] columns, Tensor[] affine, Tensor? weight, Tensor? "
    f"embeddings, {_OPTIONS}) -> (Tensor, Tensor, Tensor)", _masked_mse_forward, _masked_mse_forward_fake,
    (LossOptions,))


def _masked_mse_backward(grad: Tensor, x: Tensor, target: Tensor, columns: list, affine: list, saved: list,
                         weight: Optional[Tensor], embeddings: Optional[Tensor], options: LossOptions,
                         needs: LossNeeds) -> tuple[Tensor, Tensor, Tensor]:
    mode = options.mode(NORM_STATS if affine else NORM_NONE, needs)
    if options.use_triton:
        grads = kernels.masked_mse_backward(grad, x, target, (columns[1], columns[2]), tuple(affine), mode, weight,
                                            embeddings)
    else:
        def features(g, w):
            return cpu_blocked.masked_mse_backward(g, x, target, columns[0], tuple(affine),
                                                 (saved[0], saved[1] if options.nan_to_num else None), mode, weight=w)

        grads = features(grad, weight) if embeddings is None else cpu_hybrid.backward(
            features, grad, target, embeddings, mode, weight)
    return _grads(grads, x, target)


masked_mse_backward = define_op(
    "masked_mse_backward", "(Tensor grad, Tensor x, Tensor target, Tensor[] columns, Tensor[] affine, Tensor[] "
    f"saved, Tensor? weight, Tensor? embeddings, {_OPTIONS}, {_NEEDS}) {_GRADS}", _masked_mse_backward,
    lambda grad, x, target, columns, affine, saved, weight, embeddings, options, needs: _grads_fake(
        x, target, embeddings, needs), (LossOptions, LossNeeds))


def _masked_setup_context(ctx, inputs, outputs):
    x, target, columns, affine, weight, embeddings, options = inputs
    ctx.save_for_backward(x, target, weight, embeddings, *columns, *affine, *outputs[1:])
    ctx.options, ctx.num_affine, ctx.diff_spent = options, len(affine), False


def _masked_saved(ctx):
    """(x, target, weight, embeddings, columns, affine, saved outputs), weight and embeddings None if absent."""
    x, target, weight, embeddings, *rest = ctx.saved_tensors
    return x, target, weight, embeddings, rest[:3], rest[3 : 3 + ctx.num_affine], rest[3 + ctx.num_affine :]


def _masked_backward(ctx, grad, needs):
    x, target, weight, embeddings, columns, affine, saved = _masked_saved(ctx)
    options = ctx.options
    if ctx.ops.eager and not options.use_triton and embeddings is None:
        # The eager CPU path writes grad_target over diff, a buffer of this call's own (saved for this
        # backward alone, never returned): one batch-sized first touch fewer, 20% of a B = 65536 step. The
        # write keeps diff's version (it is not an input's); a second backward through the same graph
        # (retain_graph=True) finds diff spent and computes it again.
        if ctx.diff_spent:
            _, diff, finite = cpu_blocked.masked_mse_forward(x, target, columns[0], (*affine,), options.mode(), weight)
            saved = [diff, finite]
        ctx.diff_spent = True
        with torch.autograd._unsafe_preserve_version_counter(saved[0]):
            return cpu_blocked.masked_mse_backward(grad, x, target, columns[0], tuple(affine),
                                                 (saved[0], saved[1] if options.nan_to_num else None),
                                                 options.mode(needs=needs), overwrite_diff=True, weight=weight)
    grads = ctx.ops.masked_mse_backward(grad, x, target, columns, affine, saved, weight, embeddings, options,
                                        LossNeeds(*needs))
    return _wanted(grads, needs)


def _masked_composed(ctx):
    x, target, weight, embeddings, columns, affine, _ = _masked_saved(ctx)
    o = ctx.options
    shift, scale = affine if affine else (None, None)
    fn = functools.partial(reference.masked_mse_composed, index=columns[0], shift=shift, scale=scale,
                           nan_to_num=o.nan_to_num, reduction=o.reduction, gap=o.gap, weight=weight)
    return (lambda x, target, embeddings: fn(x, target, embeddings=embeddings)), (x, target, embeddings)


MASKED_MSE = OpAutograd("fusedvq::masked_mse_forward", _masked_mse_forward, _masked_setup_context, _masked_backward,
                        _masked_composed, grad_positions=(0, 1, 5), options=LossOptions).register()


# ------------------------------------------------------------------------------------ norm "batch"


def _batch_mse_forward(x: Tensor, target: Tensor, columns: list, eps: float, group: str, weight: Optional[Tensor],
                       embeddings: Optional[Tensor], options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    merge = merged_moments_fn(group, eps) if group else None
    mode = options.mode(NORM_BATCH)
    if options.use_triton:
        return kernels.batch_mse_forward(x, target, columns[0], eps, mode, merge, weight, embeddings)

    def features(w):
        return cpu_batch.batch_mse_forward(x, target, columns[0], eps, mode, merge, w)

    if embeddings is None:
        return features(weight)
    return cpu_hybrid.forward(features, target, embeddings, mode, weight)


def batch_outputs_fake(x: Tensor, index: Tensor, use_triton: bool) -> Tensor:
    """The fake of moments [5, K]: float32 from the kernels, the compute dtype from the CPU implementation."""
    return x.new_empty((5, index.shape[0]), dtype=torch.float32 if use_triton else COMPUTE_DTYPE[x.dtype])


def _batch_mse_forward_fake(x, target, columns, eps, group, weight, embeddings, options):
    moments = batch_outputs_fake(x, columns[0], options.use_triton)
    none = options.reduction == REDUCTION_NONE  # (its backward sums with the gradient itself)
    colsums = moments.new_empty((0 if none else 2, columns[0].shape[0]))
    return x.new_empty(_loss_shape(x, columns[0], options, embeddings)), moments, colsums


batch_mse_forward = define_op(
    "batch_mse_forward", "(Tensor x, Tensor target, Tensor[] columns, float eps, str group, Tensor? weight, Tensor? "
    f"embeddings, {_OPTIONS}) -> (Tensor, Tensor, Tensor)", _batch_mse_forward, _batch_mse_forward_fake,
    (LossOptions,))


def _batch_mse_backward(grad: Tensor, x: Tensor, target: Tensor, columns: list, saved: list, group: str,
                        weight: Optional[Tensor], embeddings: Optional[Tensor], options: LossOptions,
                        needs: LossNeeds) -> tuple[Tensor, Tensor, Tensor]:
    mode = options.mode(NORM_BATCH, needs)
    total = sum_over_ranks_fn(group) if group else None
    if options.use_triton:
        grads = kernels.batch_mse_backward(grad, x, target, tuple(columns), tuple(saved), mode, total, weight,
                                           embeddings)
    else:
        def features(g, w):
            return cpu_batch.batch_mse_backward(g, x, target, columns[0], tuple(saved), mode, total, w)

        grads = features(grad, weight) if embeddings is None else cpu_hybrid.backward(
            features, grad, target, embeddings, mode, weight)
    return _grads(grads, x, target)


batch_mse_backward = define_op(
    "batch_mse_backward", "(Tensor grad, Tensor x, Tensor target, Tensor[] columns, Tensor[] saved, str group, "
    f"Tensor? weight, Tensor? embeddings, {_OPTIONS}, {_NEEDS}) {_GRADS}", _batch_mse_backward,
    lambda grad, x, target, columns, saved, group, weight, embeddings, options, needs: _grads_fake(
        x, target, embeddings, needs), (LossOptions, LossNeeds))


def _batch_setup_context(ctx, inputs, outputs):
    x, target, columns, eps, group, weight, embeddings, options = inputs
    ctx.save_for_backward(x, target, weight, embeddings, *columns, *outputs[1:])
    ctx.eps, ctx.group, ctx.options = eps, group, options


def _batch_backward(ctx, grad, needs):
    x, target, weight, embeddings, *columns, moments, colsums = ctx.saved_tensors
    grads = ctx.ops.batch_mse_backward(grad, x, target, columns, [moments, colsums], ctx.group, weight, embeddings,
                                       ctx.options, LossNeeds(*needs))
    return _wanted(grads, needs)


def _batch_composed(ctx):
    x, target, weight, embeddings, index = ctx.saved_tensors[:5]
    o = ctx.options
    refuse_synced_higher_order(ctx.group, "double backward (create_graph=True)")
    fn = functools.partial(reference.batch_mse_composed, index=index, eps=ctx.eps, nan_to_num=o.nan_to_num,
                           reduction=o.reduction, gap=o.gap, weight=weight)
    return (lambda x, target, embeddings: fn(x, target, embeddings=embeddings)), (x, target, embeddings)


BATCH_MSE = OpAutograd("fusedvq::batch_mse_forward", _batch_mse_forward, _batch_setup_context, _batch_backward,
                       _batch_composed, grad_positions=(0, 1, 6), options=LossOptions).register()
