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
    stats = (None, None) if mean_raw is None else (mean_raw.double().cpu(), std_raw.double().cpu())
    z = oracle_z(x64, columns.cpu(), *stats, "none" if mean_raw is None else "stats", nan_to_num=nan_to_num)
    loss = F.mse_loss(z, r64, reduction=reduction)
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
    masked columns → F.mse_loss (oracle_z's normalization, whose std is sqrt(where(flat, 1, var)) so that a
    constant column has the finite gradient the composition means: plain sqrt at 0 back-propagates NaN)."""
    x64 = x.detach().to(dtype).cpu().requires_grad_()
    r64 = r.detach().to(dtype).cpu().requires_grad_()
    z = oracle_z(x64, columns.cpu(), None, None, "batch", nan_to_num=nan_to_num, eps=eps, dtype=dtype)
    loss = F.mse_loss(z, r64, reduction=reduction)
    loss.backward(grad_out.to(dtype).cpu())
    return loss.detach(), x64.grad, r64.grad


def oracle_z(x, columns, mean, std, norm, *, nan_to_num=False, eps=1e-8, dtype=torch.float64, through_stats=True):
    """z of the plain composition in `dtype` (float64: the oracle), on x's own autograd graph: nan_to_num →
    normalize all D columns (given statistics, or the batch's mean and unbiased std with σ < eps → 1 and a
    final nan_to_num) → keep the masked columns. through_stats=False: the batch's statistics as constants
    (the scale of norm="batch"'s gradient before its projections cancel, e.g. to 0 at B = 2)."""
    xt = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if nan_to_num else x
    if norm == "stats":
        z = (xt - mean.to(dtype)) / std.to(dtype)
    elif norm == "batch":
        mu = xt.mean(0)
        var = (xt - mu).square().sum(0) / (xt.shape[0] - 1)
        flat = var.detach().sqrt() < eps
        sd = torch.where(flat, torch.ones_like(var), torch.sqrt(torch.where(flat, torch.ones_like(var), var)))
        if not through_stats:
            mu, sd = mu.detach(), sd.detach()
        z = torch.nan_to_num((xt - mu) / sd, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        z = xt
    return z[:, columns]


def kept_z(x64, idx, mean_k, std_k, norm, *, nan_to_num=False, eps=1e-8, through_stats=True):
    """z [B, K] on x64's graph: oracle_z, with norm="stats" given μ, σ per kept column ([K], float64: one
    value per entry of idx, duplicates included), applied after the gather."""
    if norm != "stats":
        return oracle_z(x64, idx, None, None, norm, nan_to_num=nan_to_num, eps=eps, through_stats=through_stats)
    xt = torch.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0) if nan_to_num else x64
    return (xt[:, idx] - mean_k.double()) / std_k.double()


def weighted_oracle(x, r, idx, mean_k, std_k, grad_out, *, norm, reduction="mean", weight=None, gap=(0, 0),
                    nan_to_num=False, eps=1e-8, through_stats=True):
    """(loss, grad_x, grad_r) in float64, by autograd through the plain composition: z (kept_z) against the
    target's K columns outside the gap (at, c), e = w·(z − r)², reduced by "mean" (Σe/(B·K)), "sum",
    "none" (e) or "column" (Σ_b e / B). grad_out: [] / [B, K] / [K]. through_stats: as in oracle_z."""
    x64 = x.detach().double().cpu().requires_grad_()
    r64 = r.detach().double().cpu().requires_grad_()
    z = kept_z(x64, idx.cpu(), mean_k, std_k, norm, nan_to_num=nan_to_num, eps=eps, through_stats=through_stats)
    at, c = gap
    e = F.mse_loss(z, torch.cat([r64[:, :at], r64[:, at + c:]], 1), reduction="none")
    if weight is not None:
        e = e * weight.double().cpu()
    loss = {"none": e, "mean": e.sum() / e.numel(), "sum": e.sum(), "column": e.sum(0) / e.shape[0]}[reduction]
    gx, gr = torch.autograd.grad(loss, (x64, r64), grad_out.double().cpu())
    return loss.detach(), gx, gr


def category_weights(how, categories: dict, num_kept: int, named: Optional[dict] = None) -> torch.Tensor:
    """[K] float64 per-column weights of a per-category weight: "balanced" (w = K/(C·n) on each category's
    n distinct columns: every category weighs K/C) or "named" ({name: w}, the other columns 1)."""
    w = torch.ones(num_kept, dtype=torch.float64)
    for name, cols in categories.items():
        cols = sorted(set(cols))
        if how == "balanced":
            w[cols] = num_kept / (len(categories) * len(cols))
        elif name in named:
            w[cols] = float(named[name])
    return w


def category_oracle(column_errors: torch.Tensor, categories: dict, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """[C] float64: each category's column errors (reduction="column", weighted) summed over its distinct
    columns and divided by their total weight (their count unweighted)."""
    c = column_errors.detach().double().cpu()
    w = torch.ones_like(c) if weight is None else weight.detach().double().cpu()
    out = [c[sorted(set(cols))].sum() / w[sorted(set(cols))].sum() for cols in categories.values()]
    return torch.stack(out)


def column_oracle(x, r, columns, mean, std, grad_out, *, norm, reduction, weight=None, nan_to_num=False,
                  gap=(0, 0), eps=1e-8):
    """weighted_oracle with μ, σ given per feature column ([D], "raw", as the modules take them; None for
    norm "none" / "batch")."""
    kept = (None, None) if norm != "stats" else (mean.double()[columns.cpu()], std.double()[columns.cpu()])
    return weighted_oracle(x, r, columns, *kept, grad_out, norm=norm, reduction=reduction, weight=weight,
                           gap=gap, nan_to_num=nan_to_num, eps=eps)


def hybrid_oracle(x, r, embeddings, columns, mean, std, grad_out, *, at, norm, reduction, weight=None,
                  nan_to_num=False, eps=1e-8, through_stats=True):
    """(loss, grad_x, grad_r, grad_embeddings) in float64 of a hybrid's objective, as its trainer writes it:
    combined = z (oracle_z) with the embeddings [B, c] inserted at column `at` (torch.cat), then
    F.mse_loss(combined, r) over all K + c columns of r [B, K + c]; with weights w [K + c], e = w·(combined −
    r)² reduced by plain sums (the mean dividing by B·(K + c); "column": Σ_b e/B [K + c])."""
    x64, r64, e64 = (t.detach().double().cpu().requires_grad_() for t in (x, r, embeddings))
    z = oracle_z(x64, columns, mean, std, norm, nan_to_num=nan_to_num, eps=eps, through_stats=through_stats)
    combined = torch.cat([z[:, :at], e64, z[:, at:]], 1)
    if weight is None and reduction != "column":
        loss = F.mse_loss(combined, r64, reduction=reduction)
    else:
        e = F.mse_loss(combined, r64, reduction="none") * (1.0 if weight is None else weight.double())
        loss = {"none": e, "mean": e.sum() / e.numel(), "sum": e.sum(), "column": e.sum(0) / e.shape[0]}[reduction]
    loss.backward(grad_out.double())
    return loss.detach(), x64.grad, r64.grad, e64.grad
def partials_oracle(x, partials, columns, mean, std, norm, grad_out, *, reduction="mean", gap=(0, 0), **clean):
    """(loss, grad_x, grad_partials) in float64 of the motivating project's informativeness loss on the cleaned
    features: target = oracle_z(x) (clean: its nan_to_num, eps, through_stats), then sum(F.mse_loss(partial,
    target) for partial in partials) / P over each partial's compared columns (a gap's columns dropped);
    reduction="column": each partial's per-column F.mse_loss, [P, K]. partials: [P, B, K + c] or a list of
    [B, K + c]."""
    x64 = x.detach().double().cpu().requires_grad_()
    r64 = torch.stack(list(partials)).detach().double().cpu().requires_grad_()
    mean, std = (None, None) if mean is None else (mean.cpu(), std.cpu())
    target = oracle_z(x64, columns.cpu(), mean, std, norm, **clean)
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


def project_decoder_category_metric(x, recon, embeddings, idx, mean_k, std_k, *, at, norm, decoder_categories: dict,
                                    weight=None) -> torch.Tensor:
    """[C] float64: the motivating project's `{category}/reconstruction_mse` of a hybrid's reconstruction
    (categories' order): combined = z (kept_z: μ, σ per kept column) with the embeddings inserted at column
    `at` (torch.cat), then for each category F.mse_loss(recon[:, cols], combined[:, cols]) over its decoder
    columns (model_config's group_indices); with weights w [K + c], Σ w·(recon − combined)² over the
    category's columns divided by B·Σ w there."""
    z = kept_z(x.detach().double().cpu(), idx, mean_k, std_k, norm)
    combined = torch.cat([z[:, :at], embeddings.detach().double().cpu(), z[:, at:]], 1)
    r = recon.detach().double().cpu()
    out = []
    for cols in decoder_categories.values():
        cols = list(cols)
        if weight is None:
            out.append(F.mse_loss(r[:, cols], combined[:, cols]))
        else:
            w = weight.detach().double().cpu()[cols]
            out.append((F.mse_loss(r[:, cols], combined[:, cols], reduction="none") * w).sum() / (r.shape[0] * w.sum()))
    return torch.stack(out)


def partials_hybrid_oracle(x, partials, embeddings, columns, stats, grad_out, *, at, norm, reduction="mean", **clean):
    """(loss, grad_x, grad_partials, grad_embeddings) in float64 of the informativeness loss against a hybrid's
    combined target, as its trainer writes it: combined = oracle_z(x) (clean: nan_to_num, eps, through_stats) with the
    embeddings [B, c] inserted at column `at` (torch.cat), then sum(F.mse_loss(partial, combined) for partial
    in partials) / P over all K + c columns of each partial [B, K + c]; reduction="column": each partial's
    per-column F.mse_loss, [P, K + c] in the partials' column order. partials: [P, B, K + c] or a list; stats:
    (μ [D], σ [D]) for norm "stats", else (None, None)."""
    x64 = x.detach().double().cpu().requires_grad_()
    r64 = torch.stack(list(partials)).detach().double().cpu().requires_grad_()
    e64 = embeddings.detach().double().cpu().requires_grad_()
    mean, std = (None, None) if stats[0] is None else (t.double().cpu() for t in stats)
    z = oracle_z(x64, columns.cpu(), mean, std, norm, **clean)
    combined = torch.cat([z[:, :at], e64, z[:, at:]], 1)
    if reduction == "column":
        loss = torch.stack([F.mse_loss(r, combined, reduction="none").mean(0) for r in r64])
    else:
        loss = sum(F.mse_loss(r, combined) for r in r64) / r64.shape[0]
    loss.backward(grad_out.double().cpu())
    return loss.detach(), x64.grad, r64.grad, e64.grad
