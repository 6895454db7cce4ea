"""A categorical VQ-VAE's categories on the loss's K kept columns: per-category errors from the per-column
ones, per-column weights given per category, and the balance score over categories.

    categories   {name: kept-column indices}, in the checkpoint's order (its group_indices): string names,
                 integer indices in [0, K), each listed once (checked, never coerced)
    column errors  c[k] = Σ_b e[b, k] / B, e = w[k]·(z − r)²       (reduction="column"; w = 1 unweighted)
    category errors  E[n] = Σ_{k ∈ n} c[k] / W_n,  W_n = Σ_{k ∈ n} w[k]    (a gather of each category's columns)
        unweighted: the category's mean squared error (the mean of its columns'); with weights that are
        constant within a category (a weight per category, "balanced"), still its plain mean squared error;
        with other weights, the weight-averaged one; NaN for a category whose weights are all 0
    "balanced"   w[k] = K / (C·n_c) for k in category c of n_c columns: every category weighs K/C in all,
                 the mean loss is the mean over categories of their errors
    gini         the Gini coefficient of the category errors, Σ_i (2i − C − 1)·E_(i) / (C·ΣE), E sorted
                 ascending (0: all equal, → 1: one category holds all the error); errors finite and >= 0

Everything here runs once, at construction, except category_errors and gini. category_errors is two
gathers, two sums and a division on the device, from the weights as they are at the call (nothing derived
from a buffer is kept: a weight changed in place counts at once), with no host synchronization and no
Python loop over categories; gini is a sort on the device after one host check of the values.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import torch


def check_categories(categories: Optional[Mapping], num_kept: int) -> dict[str, tuple[int, ...]]:
    """{name: kept-column indices}, checked, never coerced: a mapping of distinct string names to integer
    indices in [0, K), each listed once; the given order kept."""
    if categories is None:
        return {}
    if not isinstance(categories, Mapping):
        raise TypeError(f"categories must be a mapping {{name: kept-column indices}} such as {{'a': [0, 1], 'b': [2]}}, "
                        f"got {type(categories).__name__} {_short(categories)}")
    out = {}
    for name, idx in categories.items():
        if not isinstance(name, str):
            raise TypeError(f"category names must be strings, got {type(name).__name__} {name!r} (name it "
                            f"{str(name)!r}: names are how weights and logs refer to a category)")
        out[str(name)] = _category_indices(str(name), idx, num_kept)
    return out


def _category_indices(name: str, idx, num_kept: int) -> tuple[int, ...]:
    """One category's kept-column indices: integers (Python, numpy, or an integer array / tensor), not a
    string, floats or a boolean mask."""
    what = f"category {name!r} must list kept-column indices (integers in [0, {num_kept - 1}])"
    if isinstance(idx, (str, bytes, Mapping)) or not hasattr(idx, "__iter__"):
        raise TypeError(f"{what}, got {type(idx).__name__} {_short(idx)}")
    if isinstance(idx, (torch.Tensor, np.ndarray)):
        kind = idx.dtype
        integer = (not idx.is_floating_point() and not idx.is_complex() and kind != torch.bool
                   if isinstance(idx, torch.Tensor) else np.issubdtype(kind, np.integer))
        if idx.ndim != 1 or not integer:
            raise TypeError(f"{what}, got a {idx.ndim}-D {kind} array" + (
                " (a boolean mask: pass its indices, mask.nonzero())" if kind in (torch.bool, np.bool_) else ""))
        idx = idx.tolist()
    values = list(idx)
    for i in values:
        if isinstance(i, (bool, np.bool_)):
            raise TypeError(f"{what}, got booleans {_short(values)} (a mask: pass the indices of its True entries)")
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{what}, got {type(i).__name__} {i!r} among {_short(values)}")
    values = [int(i) for i in values]
    if not values:
        raise ValueError(f"category {name!r} has no kept columns")
    bad = [i for i in values if not 0 <= i < num_kept]
    if bad:
        raise ValueError(f"category {name!r} has kept-column index {bad[0]}, outside the {num_kept} kept columns")
    if len(set(values)) != len(values):
        seen: set[int] = set()
        twice = next(i for i in values if i in seen or seen.add(i))
        raise ValueError(f"category {name!r} lists kept column {twice} more than once: a category holds each of its "
                         f"columns once")
    return tuple(values)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    listed = [i for idx in categories.values() for i in idx]
    count = torch.bincount(torch.tensor(listed, dtype=torch.int64), minlength=num_kept)  # (repeats count too)
    bad = (count != 1).nonzero()
    if bad.numel():
        k = int(bad[0])
        raise ValueError(f'weight="balanced" needs categories that hold each kept column once; kept column {k} is '
                         f"in {int(count[k])} of them ({int(bad.numel())} of {num_kept} columns are not in exactly one)")


def category_members(categories: dict[str, tuple[int, ...]], num_kept: int, device) -> torch.Tensor:
    """members [C, L] int64: category n's distinct kept columns, padded with K (an appended 0)."""
    rows = [sorted(set(idx)) for idx in categories.values()]
    members = torch.full((len(rows), max((len(r) for r in rows), default=0)), num_kept, dtype=torch.int64)
    for n, cols in enumerate(rows):
        members[n, : len(cols)] = torch.tensor(cols, dtype=torch.int64)
    return members.to(device)


def category_errors(column_errors: torch.Tensor, members: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                    num_kept: int) -> torch.Tensor:
    """E [C] from the column errors [K] (reduction="column"), category_members' members and the loss's
    weights [K] as they are now (None: unweighted), in column_errors' dtype, differentiable. Derived per
    call, so a weight changed in place or replaced counts at once. A gather, not a matrix product: a NaN
    column stays in its own category; a category of zero total weight gets 0/0 = NaN, not a made-up 0."""
    if members is None:
        raise ValueError("this module has no categories: build it with from_checkpoint / from_spec (a categorical "
                         "VQ-VAE), or pass categories={name: kept-column indices}")
    c = column_errors
    if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.shape[0] != num_kept:
        shape = list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
        raise ValueError(f'category_errors takes the [{num_kept}] column errors of reduction="column", got {shape}')
    if not c.is_floating_point():
        raise TypeError(f'category_errors takes the floating-point column errors of reduction="column", got {c.dtype}')
    if c.device != members.device:
        raise ValueError(f"the column errors are on {c.device} but the module's buffers on {members.device}: pass "
                         f"the errors of this module's loss, or move the module with .to()")
    wide = c.float() if c.dtype in (torch.float16, torch.bfloat16) else c
    zero = wide.new_zeros(1)
    total = ((members < num_kept).sum(1).to(wide.dtype) if weight is None
             else torch.cat([weight.to(wide.dtype), zero])[members].sum(1))
    out = torch.cat([wide, zero])[members].sum(1) / total
    return out.to(c.dtype) if out.dtype != c.dtype else out


def gini(values: torch.Tensor) -> torch.Tensor:
    """The Gini coefficient of non-negative, finite values [C] (e.g. category errors) as a 0-d tensor on
    their device, in [0, 1]: 0 when all are equal (or all 0), up to (C − 1)/C when one holds everything.
    Negative or non-finite values are refused (one host synchronization; on the device while torch.compile
    traces)."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] == 0:
        raise ValueError(f"gini takes a non-empty 1-D tensor, got {getattr(values, 'shape', type(values).__name__)}")
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"gini takes real values (e.g. category errors), got {values.dtype}")
    v = values.detach().double()
    bad = ~torch.isfinite(v) | (v < 0)
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "gini takes values that are finite and >= 0")
    elif bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"gini takes values that are finite and >= 0 (errors), got {float(v[i])} at entry {i} "
                         f"({int(bad.sum())} of {v.shape[0]} bad)")
    v = v.sort().values
    n = v.shape[0]
    rank = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    total = v.sum()
    # Σ (2i − n − 1) = 0, so the smallest value can be taken off first: equal values give exactly 0.
    g = ((2 * rank - n - 1) * (v - v[0])).sum() / (n * total.clamp_min(torch.finfo(v.dtype).tiny))
    g = g.clamp(0.0, 1.0)  # (rounding can never leave [0, 1])
    return g.to(values.dtype if values.is_floating_point() else torch.float32)
