"""The independent oracle: the float64 composition of plain torch ops (the straightforward fix), its
autograd gradients, and the helpers tests share (random inputs, relative-norm error, tolerances)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# ‖got − ref‖ / ‖ref‖ allowed per input dtype.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    return (got - ref).norm().item() / (denom if denom > 0 else 1.0)


def oracle(
    x: torch.Tensor,  # [B, D] any dtype: used as float64
    r: torch.Tensor,  # [B, K]
    columns: torch.Tensor,  # bool mask [D] or int index [K]
    mean_raw: Optional[torch.Tensor],  # [D] (None for norm="none")
    std_raw: Optional[torch.Tensor],  # [D]
    grad_out: torch.Tensor,  # [] or [B, K]
    *,
    nan_to_num: bool = False,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_r) in float64: normalize all D columns, select, F.mse_loss, autograd."""
    x64 = x.detach().double().cpu().requires_grad_()
    r64 = r.detach().double().cpu().requires_grad_()
    xt = torch.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0) if nan_to_num else x64
    z = xt if mean_raw is None else (xt - mean_raw.double().cpu()) / std_raw.double().cpu()
    loss = F.mse_loss(z[:, columns.cpu()], r64, reduction=reduction)
    loss.backward(grad_out.double().cpu())
    return loss.detach(), x64.grad, r64.grad


def random_case(B: int, D: int, K: int, *, duplicates: bool = False, mask: bool = True,
                generator: Optional[torch.Generator] = None):
    """(columns, mean_raw [D], std_raw [D]): a bool mask keeping K of D, or an index [K] (maybe repeating)."""
    g = generator
    if mask:
        columns = torch.zeros(D, dtype=torch.bool)
        columns[torch.randperm(D, generator=g)[:K]] = True
    elif duplicates:
        columns = torch.randint(0, D, (K,), generator=g)
        if K > 1:
            columns[-1] = columns[0]  # at least one repeat
    else:
        columns = torch.randperm(D, generator=g)[:K]
    mean = torch.randn(D, generator=g) * 3
    std = torch.rand(D, generator=g) * 2 + 0.25
    return columns, mean, std


def strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another layout: "contiguous", "slice" (a view into a wider tensor) or
    "transposed" (column-major storage)."""
    if how == "contiguous":
        return t.contiguous()
    if how == "slice":
        wide = torch.randn(t.shape[0], t.shape[1] + 7, dtype=t.dtype, device=t.device)
        wide[:, 3 : 3 + t.shape[1]] = t
        return wide[:, 3 : 3 + t.shape[1]]
    if how == "transposed":
        return t.t().contiguous().t()
    raise ValueError(how)


def batch_oracle(
    x: torch.Tensor,  # [B, D]
    r: torch.Tensor,  # [B, K]
    columns: torch.Tensor,  # bool mask [D] or int index [K]
    grad_out: torch.Tensor,  # [] or [B, K]
    *,
    eps: float = 1e-8,
    nan_to_num: bool = False,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_r) in float64 (or `dtype`: the eager composition of the three-way rule) of the
    batch-statistics composition, autograd through μ and σ:
    nan_to_num → column mean and unbiased std → std < eps → 1 → (x − mean)/std → nan_to_num → keep the
    masked columns → F.mse_loss. The std is taken as sqrt(where(flat, 1, var)) so that a constant column
    has the finite gradient the composition means (plain sqrt at 0 back-propagates 0·inf = NaN)."""
    x64 = x.detach().to(dtype).cpu().requires_grad_()
    r64 = r.detach().to(dtype).cpu().requires_grad_()
    xt = torch.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0) if nan_to_num else x64
    mean = xt.mean(0)
    var = (xt - mean).square().sum(0) / (xt.shape[0] - 1)
    flat = (var.detach().sqrt() < eps)
    std = torch.where(flat, torch.ones_like(var), torch.sqrt(torch.where(flat, torch.ones_like(var), var)))
    z = torch.nan_to_num((xt - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)
    loss = F.mse_loss(z[:, columns.cpu()], r64, reduction=reduction)
    loss.backward(grad_out.to(dtype).cpu())
    return loss.detach(), x64.grad, r64.grad


def oracle_z(x, columns, mean, std, norm, *, nan_to_num=False, eps=1e-8, dtype=torch.float64):
    """z of the plain composition in `dtype` (float64: the oracle), on x's own autograd graph: nan_to_num →
    normalize all D columns (given statistics, or the batch's mean and unbiased std with σ < eps → 1 and a
    final nan_to_num) → keep the masked columns."""
    xt = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if nan_to_num else x
    if norm == "stats":
        z = (xt - mean.to(dtype)) / std.to(dtype)
    elif norm == "batch":
        mu = xt.mean(0)
        var = (xt - mu).square().sum(0) / (xt.shape[0] - 1)
        flat = var.detach().sqrt() < eps
        sd = torch.where(flat, torch.ones_like(var), torch.sqrt(torch.where(flat, torch.ones_like(var), var)))
        z = torch.nan_to_num((xt - mu) / sd, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        z = xt
    return z[:, columns]


def partials_oracle(x, partials, columns, mean, std, norm, grad_out, *, reduction="mean", gap=(0, 0),
                    nan_to_num=False, eps=1e-8):
    """(loss, grad_x, grad_partials) in float64 of the motivating project's informativeness loss on the cleaned
    features: target = oracle_z(x), then sum(F.mse_loss(partial, target) for partial in partials) / P over
    each partial's compared columns (a gap's columns dropped); reduction="column": each partial's per-column
    F.mse_loss, [P, K]. partials: [P, B, K + c] or a list of [B, K + c]."""
    x64 = x.detach().double().cpu().requires_grad_()
    r64 = torch.stack(list(partials)).detach().double().cpu().requires_grad_()
    mean, std = (None, None) if mean is None else (mean.cpu(), std.cpu())
    target = oracle_z(x64, columns.cpu(), mean, std, norm, nan_to_num=nan_to_num, eps=eps)
    at, width = gap
    kept = [r64[p][:, [*range(at), *range(at + width, r64.shape[2])]] for p in range(r64.shape[0])]
    if reduction == "column":
        loss = torch.stack([F.mse_loss(r, target, reduction="none").mean(0) for r in kept])
    else:
        loss = sum(F.mse_loss(r, target) for r in kept) / len(kept)
    loss.backward(grad_out.double().cpu())
    return loss.detach(), x64.grad, r64.grad


def project_category_metric(partials, target, categories: dict, levels: int) -> torch.Tensor:
    """The motivating project's per-category metric of one batch, as its evaluation loop computes it: for
    each category in order, its `levels` partial reconstructions in turn, F.mse_loss of the partial's and the
    target's category columns as a Python float (.item()), summed and divided by the number of levels.
    partials: P = N·levels tensors [B, W]; target [B, W]; categories {name: column indices}."""
    metric, idx = [], 0
    for name, cols in categories.items():
        total = 0.0
        for _ in range(levels):
            total += F.mse_loss(partials[idx][:, list(cols)], target[:, list(cols)]).item()
            idx += 1
        metric.append(total / levels)
    return torch.tensor(metric, dtype=torch.float64)
