"""A categorical VQ-VAE's categories on the loss's K kept columns: per-category errors from the per-column
ones, per-column weights given per category, and the balance score over categories.

    categories   {name: kept-column indices}, in the checkpoint's order (its group_indices)
    column errors  c[k] = Σ_b e[b, k] / B, e = w[k]·(z − r)²       (reduction="column"; w = 1 unweighted)
    category errors  E[n] = Σ_{k ∈ n} c[k] / W_n,  W_n = Σ_{k ∈ n} w[k]    (a gather of each category's columns)
        unweighted: the category's mean squared error (the mean of its columns'); with weights that are
        constant within a category (a weight per category, "balanced"), still its plain mean squared error;
        with other weights, the weight-averaged one; NaN for a category whose weights are all 0
    "balanced"   w[k] = K / (C·n_c) for k in category c of n_c columns: every category weighs K/C in all,
                 the mean loss is the mean over categories of their errors
    gini         the Gini coefficient of the category errors, Σ_i (2i − C − 1)·E_(i) / (C·ΣE), E sorted
                 ascending (0: all equal, → 1: one category holds all the error)

Everything here runs once, at construction, except category_errors and gini: a gather, a product and a sum,
and a sort, on the device (no host synchronization, no Python loop over categories).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch


def check_categories(categories: Optional[Mapping], num_kept: int) -> dict[str, tuple[int, ...]]:
    """{name: kept-column indices} with every index in [0, K), names as strings, the given order kept."""
    out = {str(name): tuple(int(i) for i in idx) for name, idx in (categories or {}).items()}
    for name, idx in out.items():
        bad = [i for i in idx if not 0 <= i < num_kept]
        if bad:
            raise ValueError(f"category {name!r} has kept-column index {bad[0]}, outside the {num_kept} kept columns")
        if not idx:
            raise ValueError(f"category {name!r} has no kept columns")
    return out


def resolve_weight(weight, categories: dict[str, tuple[int, ...]], num_kept: int):
    """The weight argument as per-column weights: None, or a [K] float64 tensor for "balanced" and for
    {category name: weight}; any other value is returned as given (arguments.check_weight validates it)."""
    if isinstance(weight, str):
        if weight != "balanced":
            raise ValueError(f'unknown weight={weight!r}: pass "balanced", {{category: weight}}, or [K] numbers')
        if not categories:
            raise ValueError('weight="balanced" needs the VQ-VAE\'s categories: build the module with from_checkpoint'
                             ' / from_spec (or pass categories=)')
        _refuse_overlap_or_gap(categories, num_kept)
        w = torch.zeros(num_kept, dtype=torch.float64)
        for idx in categories.values():
            w[list(idx)] = num_kept / (len(categories) * len(idx))
        return w
    if isinstance(weight, Mapping):
        if not categories:
            raise ValueError("weight given per category name needs the VQ-VAE's categories: build the module with "
                             "from_checkpoint / from_spec (or pass categories=)")
        unknown = [str(n) for n in weight if str(n) not in categories]
        if unknown:
            raise ValueError(f"weight names category {unknown[0]!r}, which the VQ-VAE does not have: its categories "
                             f"are {', '.join(map(repr, categories))}")
        w = torch.ones(num_kept, dtype=torch.float64)
        owner: dict[int, str] = {}
        for name, value in weight.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"the weight of category {str(name)!r} must be a finite number >= 0, got {value!r}")
            for k in categories[str(name)]:
                if k in owner and owner[k] != str(name):
                    raise ValueError(f"kept column {k} is in categories {owner[k]!r} and {str(name)!r}, which are given "
                                     f"different weights: give per-column weights instead")
                owner[k] = str(name)
                w[k] = float(value)
        return w
    return weight


def _refuse_overlap_or_gap(categories: dict[str, tuple[int, ...]], num_kept: int) -> None:
    count = torch.zeros(num_kept, dtype=torch.int64)
    for idx in categories.values():
        count[list(idx)] += torch.ones(len(idx), dtype=torch.int64)  # (repeats within a category count too)
    bad = (count != 1).nonzero()
    if bad.numel():
        k = int(bad[0])
        raise ValueError(f'weight="balanced" needs categories that hold each kept column once; kept column {k} is '
                         f"in {int(count[k])} of them ({int(bad.numel())} of {num_kept} columns are not in exactly one)")


def category_layout(categories: dict[str, tuple[int, ...]], weight: Optional[torch.Tensor], num_kept: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """(members [C, L] int64, coef [C, L] float32): category n's distinct kept columns, padded with K (an
    appended 0), and 1/W_n beside each (W_n: their total weight, or their count unweighted; 0 beside the
    pads; inf where W_n = 0, so that the category's error is NaN, not a made-up 0)."""
    w = torch.ones(num_kept, dtype=torch.float64) if weight is None else weight.detach().to("cpu", torch.float64)
    rows = [sorted(set(idx)) for idx in categories.values()]
    width = max((len(r) for r in rows), default=0)
    members = torch.full((len(rows), width), num_kept, dtype=torch.int64)
    coef = torch.zeros((len(rows), width), dtype=torch.float64)
    for n, cols in enumerate(rows):
        total = float(w[cols].sum())
        members[n, : len(cols)] = torch.tensor(cols, dtype=torch.int64)
        coef[n, : len(cols)] = 1.0 / total if total > 0 else math.inf
    return members.to(device), coef.to(device=device, dtype=torch.float32)


def category_errors(column_errors: torch.Tensor, layout: Optional[tuple], num_kept: int) -> torch.Tensor:
    """E [C] from the column errors [K] (reduction="column") and category_layout's (members, coef), in
    column_errors' dtype, differentiable. A gather, not a matrix product: a NaN column stays in its own
    category."""
    if layout is None:
        raise ValueError("this module has no categories: build it with from_checkpoint / from_spec (a categorical "
                         "VQ-VAE), or pass categories={name: kept-column indices}")
    members, coef = layout
    c = column_errors
    if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.shape[0] != num_kept:
        shape = list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
        raise ValueError(f'category_errors takes the [{num_kept}] column errors of reduction="column", got {shape}')
    wide = c.float() if c.dtype in (torch.float16, torch.bfloat16) else c
    padded = torch.cat([wide, wide.new_zeros(1)])
    coef = coef if coef.dtype == wide.dtype and coef.device == wide.device else coef.to(wide.device, wide.dtype)
    out = (padded[members] * coef).sum(1)
    return out.to(c.dtype) if out.dtype != c.dtype else out


def gini(values: torch.Tensor) -> torch.Tensor:
    """The Gini coefficient of non-negative values [C] (e.g. category errors) as a 0-d tensor on their
    device: 0 when all are equal (or all 0), up to (C − 1)/C when one holds everything."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] == 0:
        raise ValueError(f"gini takes a non-empty 1-D tensor, got {getattr(values, 'shape', type(values).__name__)}")
    v = values.detach().double().sort().values
    n = v.shape[0]
    rank = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    total = v.sum()
    g = ((2 * rank - n - 1) * v).sum() / (n * total.clamp_min(torch.finfo(v.dtype).tiny))
    return g.to(values.dtype if values.is_floating_point() else torch.float32)
