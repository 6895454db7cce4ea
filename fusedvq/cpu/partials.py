"""The CPU implementation of P partial reconstructions against one target (reference.partials_composed states
the math): z [B, K] against partials r [P, B, K + c], with hand-written gradients, in blocked passes.

The eager loop it replaces runs, per partial, F.mse_loss forward, its backward (grad_input and a negated
grad_target) and the addition of that grad_target into z's gradient: about eight [B, K] passes a partial,
and ~10 small ops a partial at B = 4. Here a block of rows (all P partials, at most _BLOCK_ELEMENTS
elements: it stays in the core's cache) takes two ops forward (difference, squared sum) and three backward
(difference written into grad_partials, scaling, the sum over p into grad_z): each partial is read once
each way and its gradient written once. The gap's c columns are passed over as two column runs, never
gathered into a copy; their gradient is written as zeros. With a hybrid's embeddings [B, c] the gap's
columns are a third run, compared with the embeddings read in place (the target combined(z, embeddings)
is never built): the column errors [P, K + c] in decoder order, the mean over P·B·(K + c), and the
embeddings' gradient −Σ_p of the gap's, as z's is of the other columns.

grad: the reduction's upstream gradient, a 0-d tensor (mean) or [P, K (+ c)] (column), read as a tensor (no
host synchronization). Everything accumulates in the compute dtype (float64 for float64, else float32).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from ..kernels.plan import COMPUTE_DTYPE, REDUCTION_COLUMN, REDUCTION_MEAN, REDUCTION_NONE, REDUCTION_SUM, Gap

# Elements of one block of all P partials' rows (1 MiB of fp32): small enough to stay in a core's L2 between
# an op and the next, large enough that each op's parallel region is worth its start.
_BLOCK_ELEMENTS = 1 << 18


_MSE_LOSS = torch._C._nn.mse_loss  # (aten's ops without F.mse_loss's Python checks: shapes are checked before)
_MSE_BACKWARD = torch.ops.aten.mse_loss_backward.default


def column_runs(K: int, gap: Gap, embed: bool = False) -> list[tuple[int, int, int, int, int]]:
    """(source, s0, s1, w0, o0): the source's columns s0 .. s1 − 1 (source 0: z, 1: the embeddings) are the
    partials' columns w0 .. w0 + s1 − s0 − 1 and the column errors' o0 .. o0 + s1 − s0 − 1: one run without a
    gap, z's two around a Gap (at, c) (the errors' K columns), or (embed) three over all K + c columns, the
    embeddings' at the gap (the errors in decoder order)."""
    gap_at, gap_width = gap
    if not gap_width:
        return [(0, 0, K, 0, 0)]
    end = gap_at + gap_width
    runs = ((0, 0, gap_at, 0, 0), (1, 0, gap_width, gap_at, gap_at), (0, gap_at, K, end, end)) if embed else (
        (0, 0, gap_at, 0, 0), (0, gap_at, K, end, gap_at))
    return [run for run in runs if run[2] > run[1]]


def _blocks(P: int, B: int, W: int, device: torch.device):
    """Row blocks of the CPU (cache-sized); one block elsewhere (backend="reference" on CUDA)."""
    rows = max(1, _BLOCK_ELEMENTS // max(P * W, 1)) if device.type == "cpu" else max(B, 1)
    return [(b0, min(B, b0 + rows)) for b0 in range(0, B, rows)]


def _whole(z: torch.Tensor, partials: torch.Tensor, gap: Gap) -> bool:
    """Whether one block takes it all, in aten's own MSE ops: no gap, the compute dtype, a small batch (the
    ops are few, which is what counts at B = 4)."""
    return not gap.width and z.dtype is partials.dtype is COMPUTE_DTYPE[z.dtype] and (
        partials.numel() <= _BLOCK_ELEMENTS or not z.is_cpu)


def partials_forward(z: torch.Tensor, partials: torch.Tensor, reduction: int, gap: Gap,
                     embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss in z's dtype: a 0-d mean, or the [P, K] column errors ([P, K + c] with embeddings [B, c])."""
    P, B, W = partials.shape
    K = z.shape[1]
    cdt = COMPUTE_DTYPE[z.dtype]
    column = reduction == REDUCTION_COLUMN
    if embeddings is None and _whole(z, partials, gap):
        if column:
            return _MSE_LOSS(partials, z.expand(P, B, K), REDUCTION_NONE).sum(1).div_(B)
        return _MSE_LOSS(partials, z.expand(P, B, K), REDUCTION_MEAN)
    width = K if embeddings is None else W  # the compared columns
    sums = torch.zeros((P, width) if column else (), dtype=cdt, device=z.device)
    runs, blocks, sources = column_runs(K, gap, embeddings is not None), _blocks(P, B, W, z.device), (z, embeddings)
    scratch = _scratch(P, blocks, runs, cdt, z.device) if column else None
    for b0, b1 in blocks:
        for s, s0, s1, w0, o0 in runs:
            r, t = partials[:, b0:b1, w0 : w0 + s1 - s0], sources[s][b0:b1, s0:s1]
            if r.dtype != cdt:
                r, t = r.to(cdt), t.to(cdt)
            t = t.expand(r.shape)
            if column:  # (the squares in one warm scratch block, not a fresh one per block)
                e = scratch[: r.numel()].view(r.shape)
                torch._C._nn.mse_loss(r, t, REDUCTION_NONE, out=e)
                sums[:, o0 : o0 + s1 - s0] += e.sum(1)
            else:
                sums += _MSE_LOSS(r, t, REDUCTION_SUM)
    loss = sums / B if column else sums / (P * B * width)
    return loss.to(z.dtype) if loss.dtype != z.dtype else loss


def _scratch(P: int, blocks: list, runs: list, cdt, device) -> torch.Tensor:
    """A flat buffer for one block's widest run over all P partials."""
    return torch.empty(P * (blocks[0][1] - blocks[0][0]) * max(run[2] - run[1] for run in runs), dtype=cdt,
                       device=device)


def _neg_sum_over_partials(d: torch.Tensor, out: torch.Tensor, minus_ones: torch.Tensor) -> None:
    """out [rows, k] = −Σ_p d[p] (d [P, rows, k] in the compute dtype): a matrix-vector product where the
    layouts allow (measured 2 to 4× faster than a sum over the leading dimension right after d is written)."""
    flat = out.view(-1) if out.is_contiguous() and out.dtype == d.dtype else None
    if flat is not None and d[0].is_contiguous():
        torch.mv(d.reshape(d.shape[0], -1).t(), minus_ones, out=flat)
    else:
        out.copy_(d.sum(0).neg_())


def partials_backward(grad: torch.Tensor, z: torch.Tensor, partials: torch.Tensor, reduction: int, gap: Gap,
                      needs: tuple, reuse: bool = False, embeddings: Optional[torch.Tensor] = None) -> tuple:
    """(grad_z [B, K], grad_partials [P, B, K + c], contiguous, zero in the gap's columns), None where needs
    (needs_z, needs_partials) says not; with embeddings [B, c], their gradient third (needs[2]) and
    grad_partials written in the gap's columns too. reuse: grad_partials may be written into the spare buffer
    (gradient_buffer; eager calls only, never a registered op's output)."""
    P, B, W = partials.shape
    K = z.shape[1]
    cdt = COMPUTE_DTYPE[z.dtype]
    if embeddings is None and _whole(z, partials, gap):
        # aten's MSE backward with z and r swapped gives 2·g·(z − r) = −∂/∂r: summed over p, it is ∂/∂z.
        zx = z.expand(P, B, K)
        if reduction == REDUCTION_COLUMN:
            neg = _MSE_BACKWARD(grad[:, None, :] * (1.0 / B), zx, partials, REDUCTION_NONE)
        else:
            neg = _MSE_BACKWARD(grad, zx, partials, REDUCTION_MEAN)
        return neg.sum(0) if needs[0] else None, neg.neg_() if needs[1] else None
    # Per block, 2·g·(r − z) written straight into grad_partials (g = grad/(P·B·K) for the mean, grad[p, k]/B
    # for the column errors), and grad_z = −Σ_p of it while the block is in cache. (aten's MSE backward does
    # the first in one op, but the sum over p after it ran 2 to 4× slower in measurements.)
    embed = embeddings is not None
    g = grad.to(cdt) * (2.0 / B if reduction == REDUCTION_COLUMN else 2.0 / (P * B * (W if embed else K)))
    grad_z = torch.empty((B, K), dtype=z.dtype, device=z.device) if needs[0] else None
    grad_e = torch.empty(embeddings.shape, dtype=embeddings.dtype, device=z.device) if embed and needs[2] else None
    grad_p = None
    if needs[1]:
        grad_p = (gradient_buffer if reuse else torch.empty)((P, B, W), dtype=partials.dtype, device=z.device)
    if grad_p is not None and gap.width and not embed:
        grad_p[:, :, gap.at : gap.at + gap.width] = 0
    runs, blocks = column_runs(K, gap, embed), _blocks(P, B, W, z.device)
    sources, outs = (z, embeddings), (grad_z, grad_e)  # (each run's target and its gradient)
    minus_ones = torch.full((P,), -1.0, dtype=cdt, device=z.device)
    direct = partials.dtype == cdt and grad_p is not None  # written straight into grad_partials
    scratch = None if direct else _scratch(P, blocks, runs, cdt, z.device)
    for b0, b1 in blocks:
        for s, s0, s1, w0, o0 in runs:
            if outs[s] is None and grad_p is None:
                continue
            r, t = partials[:, b0:b1, w0 : w0 + s1 - s0], sources[s][b0:b1, s0:s1]
            if r.dtype != cdt:
                r, t = r.to(cdt), t.to(cdt)
            gk = g[:, None, o0 : o0 + s1 - s0] if g.dim() else g
            d = grad_p[:, b0:b1, w0 : w0 + s1 - s0] if direct else scratch[: r.numel()].view(r.shape)
            torch.sub(r, t, out=d).mul_(gk)  # 2·g·(r − target)
            if grad_p is not None and not direct:
                grad_p[:, b0:b1, w0 : w0 + s1 - s0] = d
            if outs[s] is not None:
                _neg_sum_over_partials(d, outs[s][b0:b1, s0:s1], minus_ones)
    return (grad_z, grad_p, grad_e) if embed else (grad_z, grad_p)


# A stacked input's gradient is one [P, B, W] buffer, which the step hands to the partials' .grad and
# optimizer.zero_grad() drops. Above glibc's largest recycled size (32 MiB) a fresh one is mapped anew each
# step and page-faulted in on its first write: measured at B = 16384 (270 MB), 200 of a 310 ms step. So the
# buffer of the last eager backward is kept, and handed out again (as a new tensor on its storage) when
# nothing else holds that storage any more (its use count is back to the count taken when it was made: the
# previous .grad was dropped). Every element is written before the gradient is returned.
_SPARE_LOCK = threading.Lock()
_spare: list = []  # [the buffer, its storage's use count while only this list holds it]
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _uses(t: torch.Tensor) -> int:
    return _USE_COUNT(t.untyped_storage()._cdata)


def gradient_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor of shape: the spare buffer when it is free and fits, else a fresh one
    that becomes the spare (CPU only; elsewhere, or without the use count, always a fresh one)."""
    if device.type != "cpu" or _USE_COUNT is None:
        return torch.empty(shape, dtype=dtype, device=device)
    with _SPARE_LOCK:
        if not (_spare and _spare[0].shape == shape and _spare[0].dtype == dtype and _uses(_spare[0]) == _spare[1]):
            fresh = torch.empty(shape, dtype=dtype)
            _spare[:] = [fresh, _uses(fresh)]
        return torch.empty(0, dtype=dtype).set_(_spare[0].untyped_storage(), 0, shape)


def release_spare() -> None:
    """Drop the spare gradient buffer (its memory returns when no .grad holds it)."""
    with _SPARE_LOCK:
        _spare.clear()


# ------------------------------------------------------------------------- partials given as a list
#
# A model's partial decoders return a list of P [B, W] tensors. Stacking them costs a copy, and a stacked
# input's gradient is one fresh [P, B, W] buffer: at B = 1024 17 MB that the allocator maps anew each step
# and page-faults in on its first write (measured: most of the step). Taken as a list, the partials are read
# in place and each gets a [B, W] gradient of its own, the size the eager loop allocates, which the allocator
# recycles warm. Rows go in blocks whose slice of z stays in cache while all P partials pass over it.

_LIST_BLOCK_ELEMENTS = 1 << 18  # elements of z per row block (1 MiB of fp32)


def read_in_place(z: torch.Tensor, partials: list) -> bool:
    """Whether a list goes in place: above one block of all partials (below it, stacking them and aten's few
    MSE ops cost less than P ops each way)."""
    return len(partials) * partials[0].numel() > _BLOCK_ELEMENTS


def _list_blocks(B: int, K: int):
    rows = max(1, _LIST_BLOCK_ELEMENTS // max(K, 1))
    return [(b0, min(B, b0 + rows)) for b0 in range(0, B, rows)]


def list_forward(z: torch.Tensor, partials: list, reduction: int, gap: Gap,
                 embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
    """partials_forward of P [B, W] tensors, read in place."""
    P, (B, K) = len(partials), z.shape
    cdt = COMPUTE_DTYPE[z.dtype]
    column = reduction == REDUCTION_COLUMN
    width = K if embeddings is None else partials[0].shape[1]
    sums = torch.zeros((P, width) if column else (), dtype=cdt, device=z.device)
    for b0, b1 in _list_blocks(B, K):
        for s, s0, s1, w0, o0 in column_runs(K, gap, embeddings is not None):
            t = (z, embeddings)[s][b0:b1, s0:s1]
            t = t if t.dtype == cdt else t.to(cdt)
            for p, partial in enumerate(partials):
                r = partial[b0:b1, w0 : w0 + s1 - s0]
                r = r if r.dtype == cdt else r.to(cdt)
                if column:
                    sums[p, o0 : o0 + s1 - s0] += _MSE_LOSS(r, t, REDUCTION_NONE).sum(0)
                else:
                    sums += _MSE_LOSS(r, t, REDUCTION_SUM)
    loss = sums / B if column else sums / (P * B * width)
    return loss.to(z.dtype) if loss.dtype != z.dtype else loss


def list_backward(grad: torch.Tensor, z: torch.Tensor, partials: list, reduction: int, gap: Gap,
                  needs: tuple, embeddings: Optional[torch.Tensor] = None) -> tuple:
    """(grad_z [B, K] or None, [grad_partial [B, W]] * P or None) (and with embeddings their gradient [B, c]
    or None third): partials_backward of P [B, W] tensors."""
    P, (B, K), W = len(partials), z.shape, partials[0].shape[1]
    cdt, embed = COMPUTE_DTYPE[z.dtype], embeddings is not None
    g = grad.to(cdt) * (2.0 / B if reduction == REDUCTION_COLUMN else 2.0 / (P * B * (W if embed else K)))
    sums = [torch.empty(t.shape, dtype=cdt, device=z.device) if t is not None and need else None
            for t, need in ((z, needs[0]), (embeddings, embed and needs[2]))]  # −Σ_p of grad_partials, per source
    grads = [torch.empty((B, W), dtype=partials[0].dtype, device=z.device) for _ in range(P)] if needs[1] else None
    if grads is not None and gap.width and not embed:
        for gp in grads:
            gp[:, gap.at : gap.at + gap.width] = 0
    direct = grads is not None and partials[0].dtype == cdt
    for b0, b1 in _list_blocks(B, K):
        for s, s0, s1, w0, o0 in column_runs(K, gap, embed):
            if sums[s] is None and grads is None:
                continue
            t = (z, embeddings)[s][b0:b1, s0:s1]
            t = t if t.dtype == cdt else t.to(cdt)
            shift = None if g.dim() else t * -g  # −2g·target, once per block for the mean
            for p, partial in enumerate(partials):
                r = partial[b0:b1, w0 : w0 + s1 - s0]
                gk = g[p, o0 : o0 + s1 - s0] if g.dim() else g
                # 2g·(r − target) = r·2g − 2g·target in one pass over r
                if direct:
                    d = torch.addcmul(t * -gk if shift is None else shift, r, gk,
                                      out=grads[p][b0:b1, w0 : w0 + s1 - s0])
                else:
                    d = torch.addcmul(t * -gk if shift is None else shift, r.to(cdt), gk)
                if grads is not None and not direct:
                    grads[p][b0:b1, w0 : w0 + s1 - s0] = d
                if sums[s] is not None:
                    gs = sums[s][b0:b1, s0:s1]
                    torch.neg(d, out=gs) if p == 0 else gs.sub_(d)
    grad_z, grad_e = (t if t is None or t.dtype == like.dtype else t.to(like.dtype)
                      for t, like in zip(sums, (z, embeddings)))
    return (grad_z, grads, grad_e) if embed else (grad_z, grads)
