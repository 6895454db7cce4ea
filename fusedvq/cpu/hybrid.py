"""A hybrid's objective on the CPU's blocked passes (blocked.py, batch.py): one MSE over the decoder's K + c
columns, the K feature columns' z and the caller's c embeddings [B, c] at decoder columns at .. at + c − 1,
without a combined [B, K + c] copy. The blocked passes compute the feature columns' loss as they do for a
gapped target (read around the gap in place) with the feature columns' weights; the c embedding columns'
terms, e = w·(emb − r)² [B, c], are computed here; the reduction's arithmetic joins them:

    mean    L = (B·K·a + Σe)/(B·(K + c)) = a·K/(K + c) + Σe/(B·(K + c))     a: the feature columns' mean
    sum     L = a + Σe
    column  L = [a[:at], Σ_b e/B, a[at:]]   ([K + c], decoder order)
    none    L = [a[:, :at], e, a[:, at:]]   ([B, K + c])
and back: the feature columns' part takes grad_out·K/(K + c) (mean), grad_out (sum), or grad_out without
the gap's columns (column, none); ∂L/∂emb = 2·g·w·(emb − r) = −∂L/∂r on the gap's columns, with g =
grad_out/(B·(K + c)) | grad_out | grad_out[at:at + c]/B | grad_out[:, at:at + c].
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.plan import COMPUTE_DTYPE, REDUCTION_COLUMN, REDUCTION_MEAN, REDUCTION_NONE, Gap, Mode


def around_gap(t: torch.Tensor, gap: Gap) -> torch.Tensor:
    """The columns (last dimension) of t [..., K + c] outside the gap: [..., K]."""
    gap_at, gap_width = gap
    return torch.cat([t[..., :gap_at], t[..., gap_at + gap_width :]], dim=-1)


def _split_weight(weight: Optional[torch.Tensor], gap) -> tuple:
    """(the feature columns' weights [K], the embedding columns' [c]) of weight [K + c], or (None, None)."""
    if weight is None:
        return None, None
    return around_gap(weight, gap), weight[gap.at : gap.at + gap.width]


def _embedding_diff(target: torch.Tensor, embeddings: torch.Tensor, gap, cdt) -> torch.Tensor:
    """emb − r on the gap's columns, [B, c] contiguous in the compute dtype (whatever the inputs' strides)."""
    gap_at, gap_width = gap
    out = torch.empty((embeddings.shape[0], gap_width), dtype=cdt, device=embeddings.device)
    return torch.sub(embeddings, target[:, gap_at : gap_at + gap_width], out=out)


def forward(features: Callable, target: torch.Tensor, embeddings: torch.Tensor, mode: Mode,
            weight: Optional[torch.Tensor]) -> tuple:
    """(loss, *saved) of the hybrid's objective, saved being what features() returns beside its loss:
    features(w) -> (the feature columns' loss under mode.reduction with the weights w [K] or None, *saved)."""
    w_f, w_e = _split_weight(weight, mode.gap)
    loss_f, *saved = features(w_f)
    cdt = COMPUTE_DTYPE[loss_f.dtype]
    e = _embedding_diff(target, embeddings, mode.gap, cdt).square_()
    if w_e is not None:
        e = e.mul_(w_e)
    B, gap_width, gap_at = e.shape[0], mode.gap.width, mode.gap.at
    K = target.shape[1] - gap_width
    if mode.reduction == REDUCTION_NONE:
        loss = torch.cat([loss_f[:, :gap_at], e.to(loss_f.dtype), loss_f[:, gap_at:]], dim=1)
    elif mode.reduction == REDUCTION_COLUMN:
        loss = torch.cat([loss_f[:gap_at], (e.sum(0) / max(B, 1)).to(loss_f.dtype), loss_f[gap_at:]])
    elif mode.reduction == REDUCTION_MEAN:
        loss = (loss_f.to(cdt) * (K / (K + gap_width)) + e.sum() / max(B * (K + gap_width), 1)).to(loss_f.dtype)
    else:
        loss = (loss_f.to(cdt) + e.sum()).to(loss_f.dtype)
    return (loss, *saved)


def backward(features: Callable, grad: torch.Tensor, target: torch.Tensor, embeddings: torch.Tensor, mode: Mode,
             weight: Optional[torch.Tensor]) -> tuple:
    """(grad_x, grad_target, grad_embeddings), None where mode.needs (x, target, embeddings) says not:
    features(grad of the feature columns' loss, their weights [K] or None) -> (grad_x, grad_target) of the
    blocked pass (grad_target zero on the gap's columns, written here)."""
    w_f, w_e = _split_weight(weight, mode.gap)
    gap_at, gap_width = mode.gap
    B, K, reduction = target.shape[0], target.shape[1] - gap_width, mode.reduction
    if reduction == REDUCTION_MEAN:
        g_f, g_e = grad * (K / (K + gap_width)), grad / max(B * (K + gap_width), 1)
    elif reduction in (REDUCTION_NONE, REDUCTION_COLUMN):
        g_f, g_e = around_gap(grad, mode.gap), grad[..., gap_at : gap_at + gap_width]
        g_e = g_e / max(B, 1) if reduction == REDUCTION_COLUMN else g_e
    else:
        g_f, g_e = grad, grad
    grad_x, grad_target = features(g_f, w_f)
    grad_e = None
    if grad_target is not None or mode.needs[2]:
        cdt = COMPUTE_DTYPE[embeddings.dtype]
        dz = _embedding_diff(target, embeddings, mode.gap, cdt).mul_(g_e.to(cdt) * 2.0)
        if w_e is not None:
            dz = dz.mul_(w_e)
        if grad_target is not None:
            grad_target[:, gap_at : gap_at + gap_width] = dz.neg()
        grad_e = dz.to(embeddings.dtype) if mode.needs[2] else None
    return grad_x, grad_target, grad_e
