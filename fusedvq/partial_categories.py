"""The per-category metric of P partial reconstructions, as a categorical, hierarchical VQ-VAE's evaluation
computes it: category n's MSE on its own columns, averaged over its own partials (`{category}/reconstruction_mse`
of one batch), from the [P, W] column errors of partials_mse's reduction="column" — W = K kept feature columns,
or a hybrid objective's K + c decoder columns (the categories then in decoder columns) — as one gather on the
device, with no host synchronization.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F


class PartialCategories(NamedTuple):
    """Which partials and columns each category's metric averages (partial_category_layout)."""

    names: tuple
    num_partials: int  # P
    num_columns: int  # K
    partials: torch.Tensor  # [C, Lp] int64: category n's partials, padded with P (a zero row)
    columns: torch.Tensor  # [C, Lc] int64: its columns, repeats kept (as x[:, cols] counts them), padded with K
    # [C, Lp, Lc] float64 (cast to the errors' dtype on use): 1/(L_n·|cols_n|) at real (partial, column) pairs,
    # 0 at the pads
    coef: torch.Tensor


def partial_category_layout(categories: dict, num_columns: int, *, levels: Optional[int] = None,
                            partial_categories: Optional[Sequence] = None, device=None) -> PartialCategories:
    """The layout of categories {name: column indices in [0, K)} over P partials given as N×L (levels) or
    by each partial's category (a name or a position in categories' order)."""
    names = tuple(categories)
    if (levels is None) == (partial_categories is None):
        raise ValueError("give exactly one of levels= (P = N·L partials in category order) and partial_categories= "
                         "(each partial's category)")
    if levels is not None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise TypeError(f"levels must be an int >= 1, got {type(levels).__name__} {levels!r}")
        owner = [n for n in range(len(names)) for _ in range(levels)]
    else:
        owner = []
        for p, c in enumerate(partial_categories):
            if isinstance(c, str) and c in names:
                owner.append(names.index(c))
            elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(names):
                owner.append(c)
            else:
                raise ValueError(f"partial_categories[{p}] = {c!r} is neither a category name nor a position in "
                                 f"[0, {len(names)}): the categories are {', '.join(map(repr, names))}")
    P = len(owner)
    parts = [[p for p in range(P) if owner[p] == n] for n in range(len(names))]
    for n, own in enumerate(parts):
        if not own:
            raise ValueError(f"category {names[n]!r} has no partial reconstruction among the {P} partials")
    cols = [list(categories[name]) for name in names]
    for name, c in zip(names, cols):
        bad = [k for k in c if not 0 <= k < num_columns]
        if bad or not c:
            raise ValueError(f"category {name!r} must name columns in [0, {num_columns}), got {bad[:1] or 'none'}")
    lp, lc = max(map(len, parts)), max(map(len, cols))
    pt = torch.full((len(names), lp), P, dtype=torch.int64)
    ct = torch.full((len(names), lc), num_columns, dtype=torch.int64)
    coef = torch.zeros((len(names), lp, lc), dtype=torch.float64)
    for n, (own, c) in enumerate(zip(parts, cols)):
        pt[n, : len(own)] = torch.tensor(own)
        ct[n, : len(c)] = torch.tensor(c)
        coef[n, : len(own), : len(c)] = 1.0 / (len(own) * len(c))
    return PartialCategories(names, P, num_columns, pt.to(device), ct.to(device), coef.to(device))


def category_errors_of(errors: torch.Tensor, layout: PartialCategories, method: str = "category_errors",
                       columns: str = "") -> torch.Tensor:
    """E[n] = (1/L_n) Σ_{p ∈ n} (1/|cols_n|) Σ_{k ∈ cols_n} errors[p, k], [C], as a gather (a NaN stays in
    its own categories). method and columns (which columns they are): as the error says them."""
    P, K = layout.num_partials, layout.num_columns
    if not isinstance(errors, torch.Tensor) or tuple(errors.shape) != (P, K):
        shape = list(errors.shape) if isinstance(errors, torch.Tensor) else type(errors).__name__
        raise ValueError(f'{method} takes the [{P}, {K}] errors of reduction="column" (P = {P} partials, '
                         f"{columns or f'K = {K} columns'}), got {shape}")
    wide = errors.float() if errors.dtype in (torch.float16, torch.bfloat16) else errors
    padded = F.pad(wide, (0, 1, 0, 1))  # [P + 1, K + 1]: the pads read 0
    coef = layout.coef.to(wide.device, wide.dtype)
    out = (padded[layout.partials[:, :, None], layout.columns[:, None, :]] * coef).sum((1, 2))
    return out.to(errors.dtype) if out.dtype != errors.dtype else out


def partial_category_errors(errors: torch.Tensor, categories: dict, *, levels: Optional[int] = None,
                            partial_categories: Optional[Sequence] = None) -> torch.Tensor:
    """The per-category metric [C] (categories' order) of the [P, K] errors of reduction="column": category
    n's MSE on its own columns averaged over its own partials (levels= for N×L, or partial_categories=).
    Builds the layout on each call: a module (PartialsMSELoss) builds it once."""
    layout = partial_category_layout(categories, errors.shape[-1], levels=levels,
                                     partial_categories=partial_categories, device=errors.device)
    return category_errors_of(errors, layout)
