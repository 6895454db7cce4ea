"""The loss as registered ops: norm "none" / "stats" and norm "batch", each a forward and a backward op with
one autograd Definition (ops/__init__.py runs it eagerly, torch.library.register_autograd when traced).

    fusedvq::masked_mse_forward(x, target, columns, stats, mode, embeddings=None) -> (loss, diff, finite)
    fusedvq::masked_mse_backward(grad, x, target, columns, stats, saved, mode, embeddings=None,
                                 needs_embeddings=False) -> (grad_x, grad_target, grad_embeddings)
    fusedvq::batch_mse_forward(x, target, columns, eps, group, mode, embeddings=None) -> (loss, stats [5, K],
                                                                                          colsums)
    fusedvq::batch_mse_backward(grad, x, target, columns, saved, group, mode, embeddings=None,
                                needs_embeddings=False) -> (grad_x, grad_target, grad_embeddings)

columns = [index [K] int64, inv_ptr [D+1] int32, inv_k [K] int32] (kernels/plan.py's ColumnMap: inputs,
so that autograd saves them for the backward, which writes grad_x as a gather through the inverse), and
for a weighted loss a fourth, weight [K] in the compute dtype (`weight` below reads it);
stats = [] (norm "none") or [μ, 1/σ] [K] in the compute dtype; mode = [nan_to_num, reduction, use_triton,
gap_at, gap] and, for backwards, [needs_x, needs_target]: the gradient not wanted is neither computed into
memory nor written (a 0-element placeholder comes back). The target is [B, K + gap], its columns gap_at ..
gap_at + gap − 1 skipped (a hybrid VQ-VAE's embedding columns), read and written in place. embeddings
[B, gap] (named, optional): a hybrid's objective instead, one MSE over all K + gap target columns with the
embeddings compared on the gap's columns (loss [K + gap] / [B, K + gap] for reductions column / none,
weight [K + gap]); the backward then also gives grad_embeddings (0-element unless needs_embeddings).

saved: norm "none"/"stats" [diff, finite] — the CPU path keeps diff [B, K] (and the finite mask with
nan_to_num) to avoid a second gather, the kernels recompute z and return both empty; norm "batch"
[stats [5, K], colsums [2, K] ([0, K] for reduction "none")]. group: "" for this batch's own statistics,
else a key from ops/distributed.py (all ranks' rows).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..cpu import batch as cpu_batch
from ..cpu import hybrid as cpu_hybrid
from ..cpu import stats as cpu_stats
from ..kernels.plan import NORM_BATCH, NORM_NONE, NORM_STATS, REDUCTION_COLUMN, REDUCTION_NONE, COMPUTE_DTYPE, Mode
from . import Definition, autocast_off, kernel_mode, kernels, refuse_synced_higher_order
from .distributed import merged_stats_fn, sum_over_ranks_fn


def empty(like: Tensor, dtype=None) -> Tensor:
    """A 0-element placeholder output (what an implementation does not produce)."""
    return like.new_empty(0, dtype=dtype)


def grads_fake(x: Tensor, target, needs) -> tuple:
    """The fake of a backward: fresh contiguous gradients, 0-element where not wanted."""
    fresh = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    return fresh(x) if needs[0] else empty(x), fresh(target) if needs[1] else empty(target)


def outputs(grads, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """An implementation's (grad_x, grad_target), None where not wanted, as op outputs (0-element there)."""
    return tuple(empty(like) if g is None else g for g, like in zip(grads, (x, target)))


def _loss_shape(x: Tensor, index: Tensor, mode, embeddings=None) -> tuple[int, ...]:
    width = index.shape[0] + (mode[4] if embeddings is not None else 0)
    return (x.shape[0], width) if mode[1] == REDUCTION_NONE else (width,) if mode[1] == REDUCTION_COLUMN else ()


def grads3(grads, x: Tensor, target: Tensor, embeddings) -> tuple[Tensor, Tensor, Tensor]:
    """An implementation's (grad_x, grad_target[, grad_embeddings]) as the backward op's three outputs."""
    return (*outputs(grads[:2], x, target), empty(x) if len(grads) < 3 or grads[2] is None else grads[2])


def grads3_fake(x: Tensor, target, embeddings, needs, needs_embeddings: bool) -> tuple:
    fresh = torch.empty_like(embeddings, memory_format=torch.contiguous_format) if needs_embeddings else empty(x)
    return (*grads_fake(x, target, needs), fresh)


def _norm(stats: list) -> int:
    """The norm code of a stats list: "stats" with (μ, 1/σ), "none" without."""
    return NORM_STATS if stats else NORM_NONE


def weight(columns) -> Optional[Tensor]:
    """The loss's per-column weights [K] of a columns list, or None."""
    return columns[3] if len(columns) > 3 else None


# ------------------------------------------------------------------------------ norm "none" / "stats"


@autocast_off
def _masked_mse_forward(x: Tensor, target: Tensor, columns: list[Tensor], stats: list[Tensor],
                       mode: list[int], embeddings: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    if mode[2]:
        return kernels().masked_mse_forward(x, target, columns[0], tuple(stats), kernel_mode(mode, _norm(stats)),
                                            weight(columns), embeddings), empty(x), empty(x, torch.bool)

    def features(w):
        loss, diff, finite = cpu_stats.masked_mse_forward(x, target, columns[0], tuple(stats), kernel_mode(mode), w)
        return loss, diff, finite if finite is not None else empty(x, torch.bool)

    if embeddings is None:
        return features(weight(columns))
    return cpu_hybrid.forward(features, target, embeddings, kernel_mode(mode), weight(columns))


masked_mse_forward = torch.library.custom_op("fusedvq::masked_mse_forward", mutates_args=())(_masked_mse_forward)


@masked_mse_forward.register_fake
def _(x, target, columns, stats, mode, embeddings=None):
    loss = x.new_empty(_loss_shape(x, columns[0], mode, embeddings))
    if mode[2]:
        return loss, empty(x), empty(x, torch.bool)
    diff = x.new_empty((x.shape[0], columns[0].shape[0]), dtype=COMPUTE_DTYPE[x.dtype])
    return loss, diff, diff.new_empty(diff.shape if mode[0] else (0,), dtype=torch.bool)


@autocast_off
def _masked_mse_backward(grad: Tensor, x: Tensor, target: Tensor, columns: list[Tensor], stats: list[Tensor],
                         saved: list[Tensor], mode: list[int], embeddings: Optional[Tensor] = None,
                         needs_embeddings: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    km = kernel_mode(mode, _norm(stats), needs=(bool(mode[5]), bool(mode[6]), needs_embeddings))
    if mode[2]:
        grads = kernels().masked_mse_backward(grad, x, target, (columns[1], columns[2]), tuple(stats), km,
                                              weight(columns), embeddings)
    else:
        def features(g, w):
            return cpu_stats.masked_mse_backward(g, x, target, columns[0], tuple(stats),
                                                 (saved[0], saved[1] if mode[0] else None), km, weight=w)

        grads = features(grad, weight(columns)) if embeddings is None else cpu_hybrid.backward(
            features, grad, target, embeddings, km, weight(columns))
    return grads3(grads, x, target, embeddings)


masked_mse_backward = torch.library.custom_op("fusedvq::masked_mse_backward", mutates_args=())(_masked_mse_backward)


@masked_mse_backward.register_fake
def _(grad, x, target, columns, stats, saved, mode, embeddings=None, needs_embeddings=False):
    return grads3_fake(x, target, embeddings, mode[5:7], needs_embeddings)


def _masked_setup_context(ctx, inputs, output):
    x, target, columns, stats, mode, *embeddings = inputs
    embedded = [] if not embeddings or embeddings[0] is None else embeddings[:1]
    ctx.save_for_backward(x, target, *columns, *stats, *output[1:], *embedded)
    ctx.mode, ctx.counts, ctx.diff_spent = list(mode), (len(columns), len(stats), len(embedded)), False


def _masked_saved(ctx):
    """(x, target, columns, stats, saved outputs, embeddings or None)."""
    x, target, *rest = ctx.saved_tensors
    c, s, e = ctx.counts
    return x, target, rest[:c], rest[c : c + s], rest[c + s : len(rest) - e], rest[-1] if e else None


def _masked_backward(ctx, grad, needs, eager):
    x, target, columns, stats, saved, embeddings = _masked_saved(ctx)
    mode = ctx.mode
    if embeddings is not None:
        return _hybrid_backward(_masked_mse_backward if eager else masked_mse_backward,
                                (grad, x, target, columns, stats, saved), mode, embeddings, needs, 3)
    if eager and not mode[2]:
        # The eager CPU path writes grad_target over diff, a buffer of this call's own (saved for this
        # backward alone, never returned): one batch-sized first touch fewer, 20% of a B = 65536 step. The
        # write keeps diff's version (it is not an input's); a second backward through the same graph
        # (retain_graph=True) finds diff spent and computes it again.
        if ctx.diff_spent:
            _, diff, finite = cpu_stats.masked_mse_forward(x, target, columns[0], tuple(stats), kernel_mode(mode),
                                                           weight(columns))
            saved = [diff, finite]
        ctx.diff_spent = True
        with torch.autograd._unsafe_preserve_version_counter(saved[0]):
            grads = cpu_stats.masked_mse_backward(grad, x, target, columns[0], tuple(stats),
                                                  (saved[0], saved[1] if mode[0] else None),
                                                  kernel_mode(mode, needs=needs), overwrite_diff=True,
                                                  weight=weight(columns))
        return (*grads, None, None, None)
    backward = _masked_mse_backward if eager else masked_mse_backward
    grads = backward(grad, x, target, columns, stats, saved, [*mode, *map(int, needs[:2])])
    return (*(g if need else None for g, need in zip(grads[:2], needs)), None, None, None)


def _masked_composed(ctx):
    x, target, columns, stats, _, embeddings = _masked_saved(ctx)
    mode = ctx.mode
    shift, scale = stats if stats else (None, None)
    fn = functools.partial(reference.masked_mse_composed, index=columns[0], shift=shift, scale=scale,
                           nan_to_num=bool(mode[0]), reduction=mode[1], gap=(mode[3], mode[4]), weight=weight(columns))
    return (lambda x, target, embeddings: fn(x, target, embeddings=embeddings)), (x, target, embeddings)


def _hybrid_backward(backward, args: tuple, mode: list, embeddings: Tensor, needs: tuple, options: int) -> tuple:
    """The gradients of every input of a hybrid's forward op (x, target, `options` inputs, embeddings):
    backward(*args, mode with the needs, embeddings, needs_embeddings) is the backward op or its eager
    implementation."""
    needs = (*needs, False)[:3]
    grads = backward(*args, [*mode, int(needs[0]), int(needs[1])], embeddings, needs[2])
    gx, gt, ge = (g if need else None for g, need in zip(grads, needs))
    return (gx, gt, *[None] * options, ge)


MASKED_MSE = Definition("fusedvq::masked_mse_forward", _masked_mse_forward, _masked_setup_context,
                        _masked_backward, _masked_composed, differentiable=2, later=(5,)).register()


# ------------------------------------------------------------------------------------ norm "batch"


@autocast_off
def _batch_mse_forward(x: Tensor, target: Tensor, columns: list[Tensor], eps: float, group: str,
                       mode: list[int], embeddings: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    merge = merged_stats_fn(group, eps) if group else None
    km = kernel_mode(mode, NORM_BATCH)
    if mode[2]:
        return kernels().batch_mse_forward(x, target, columns[0], eps, km, merge, weight(columns), embeddings)

    def features(w):
        return cpu_batch.batch_mse_forward(x, target, columns[0], eps, km, merge, w)

    if embeddings is None:
        return features(weight(columns))
    return cpu_hybrid.forward(features, target, embeddings, km, weight(columns))


def batch_outputs_fake(x: Tensor, index: Tensor, use_triton: bool) -> Tensor:
    """The fake of stats [5, K]: float32 from the kernels, the compute dtype from the CPU implementation."""
    return x.new_empty((5, index.shape[0]), dtype=torch.float32 if use_triton else COMPUTE_DTYPE[x.dtype])


batch_mse_forward = torch.library.custom_op("fusedvq::batch_mse_forward", mutates_args=())(_batch_mse_forward)


@batch_mse_forward.register_fake
def _(x, target, columns, eps, group, mode, embeddings=None):
    stats = batch_outputs_fake(x, columns[0], mode[2])
    colsums = stats.new_empty((0 if mode[1] == REDUCTION_NONE else 2, columns[0].shape[0]))  # none: backward sums
    return x.new_empty(_loss_shape(x, columns[0], mode, embeddings)), stats, colsums


@autocast_off
def _batch_mse_backward(grad: Tensor, x: Tensor, target: Tensor, columns: list[Tensor], saved: list[Tensor],
                        group: str, mode: list[int], embeddings: Optional[Tensor] = None,
                        needs_embeddings: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    km = kernel_mode(mode, NORM_BATCH, needs=(bool(mode[5]), bool(mode[6]), needs_embeddings))
    total = sum_over_ranks_fn(group) if group else None
    if mode[2]:
        grads = kernels().batch_mse_backward(grad, x, target, tuple(columns[:3]), tuple(saved), km, total,
                                             weight(columns), embeddings)
    else:
        def features(g, w):
            return cpu_batch.batch_mse_backward(g, x, target, columns[0], tuple(saved), km, total, w)

        grads = features(grad, weight(columns)) if embeddings is None else cpu_hybrid.backward(
            features, grad, target, embeddings, km, weight(columns))
    return grads3(grads, x, target, embeddings)


batch_mse_backward = torch.library.custom_op("fusedvq::batch_mse_backward", mutates_args=())(_batch_mse_backward)


@batch_mse_backward.register_fake
def _(grad, x, target, columns, saved, group, mode, embeddings=None, needs_embeddings=False):
    return grads3_fake(x, target, embeddings, mode[5:7], needs_embeddings)


def _batch_setup_context(ctx, inputs, output):
    x, target, columns, eps, group, mode, *embeddings = inputs
    embedded = [] if not embeddings or embeddings[0] is None else embeddings[:1]
    ctx.save_for_backward(x, target, *columns, *output[1:], *embedded)
    ctx.options = (eps, group, list(mode))
    ctx.counts = (len(columns), len(embedded))


def _batch_saved(ctx):
    """(x, target, columns, [stats, colsums], embeddings or None)."""
    x, target, *rest = ctx.saved_tensors
    c, e = ctx.counts
    return x, target, rest[:c], rest[c : c + 2], rest[-1] if e else None


def _batch_backward(ctx, grad, needs, eager):
    x, target, columns, saved, embeddings = _batch_saved(ctx)
    _, group, mode = ctx.options
    backward = _batch_mse_backward if eager else batch_mse_backward
    if embeddings is not None:
        return _hybrid_backward(backward, (grad, x, target, columns, saved, group), mode, embeddings, needs, 4)
    grads = backward(grad, x, target, columns, saved, group, [*mode, *map(int, needs[:2])])
    return (*(g if need else None for g, need in zip(grads[:2], needs)), None, None, None, None)


def _batch_composed(ctx):
    x, target, columns, _, embeddings = _batch_saved(ctx)
    eps, group, mode = ctx.options
    refuse_synced_higher_order(group, "double backward (create_graph=True)")
    fn = functools.partial(reference.batch_mse_composed, index=columns[0], eps=eps, nan_to_num=bool(mode[0]),
                           reduction=mode[1], gap=(mode[3], mode[4]), weight=weight(columns))
    return (lambda x, target, embeddings: fn(x, target, embeddings=embeddings)), (x, target, embeddings)


BATCH_MSE = Definition("fusedvq::batch_mse_forward", _batch_mse_forward, _batch_setup_context,
                       _batch_backward, _batch_composed, differentiable=2, later=(6,)).register()
