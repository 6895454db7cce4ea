"""A categorical VQ-VAE's categories: per-category errors from the per-column ones, and the balance score
over categories (per-column weights given per category are weights.py's).

    categories          {name: kept-column indices in [0, K)}: over the K kept feature columns (the
                        statistics', the weights' and the feature-only loss's; a hybrid's pre_model_group_indices)
    decoder_categories  the same names over the decoder's K + c columns (a hybrid's model_config group_indices:
                        the INITIAL category also holds the c embedding columns); = categories when c = 0
        one order (the checkpoint's); checked, never coerced: string names, integers in range, each once
    column errors     c[j] = Σ_b e[b, j] / B, e = w[j]·(z − r)²      (reduction="column"; w = 1 unweighted)
    category errors   E[n] = Σ_{j ∈ n} c[j] / W_n,  W_n = Σ_{j ∈ n} w[j]   (a gather of each category's columns)
        unweighted: the category's mean squared error; with weights constant within a category (a weight
        per category, "balanced"), still that; with others, the weight-averaged one; NaN for a category
        whose weights are all 0. category_errors: over decoder columns, from a hybrid objective's [K + c]
        errors (with embeddings=), the trainer's `{category}/reconstruction_mse`; feature_category_errors:
        over kept feature columns, from the [K] errors of the feature columns alone (the same when c = 0)
    gini         the Gini coefficient of the category errors, Σ_i (2i − C − 1)·E_(i) / (C·ΣE), E sorted
                 ascending (0: all equal, → 1: one category holds all the error); errors finite and >= 0

Everything here runs once, at construction, except the category errors and gini. A category error is two
gathers, two sums and a division on the device, from the weights as they are at the call (nothing derived
from a buffer is kept: a weight changed in place counts at once), with no host synchronization and no
Python loop over categories; gini is a sort on the device after one host check of the values.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch


def check_categories(categories: Optional[Mapping], num_kept: int, space: str = "kept") -> dict[str, tuple[int, ...]]:
    """{name: column indices}, checked, never coerced: a mapping of distinct string names to integer indices
    in [0, num_kept), each listed once; the given order kept. space: "kept" (categories, K kept feature
    columns) or "decoder" (decoder_categories, a hybrid's K + c decoder columns), as the errors say it."""
    if categories is None:
        return {}
    if not isinstance(categories, Mapping):
        argument = "categories" if space == "kept" else f"{space}_categories"
        raise TypeError(f"{argument} must be a mapping {{name: {space}-column indices}} such as {{'a': [0, 1], "
                        f"'b': [2]}}, got {type(categories).__name__} {_short(categories)}")
    out = {}
    for name, idx in categories.items():
        if not isinstance(name, str):
            raise TypeError(f"category names must be strings, got {type(name).__name__} {name!r} (name it "
                            f"{str(name)!r}: names are how weights and logs refer to a category)")
        out[str(name)] = _category_indices(str(name), idx, num_kept, space)
    return out


def _category_indices(name: str, idx, num_kept: int, space: str) -> tuple[int, ...]:
    """One category's column indices: integers (Python, numpy, or an integer array / tensor), not a
    string, floats or a boolean mask."""
    what = f"category {name!r} must list {space}-column indices (integers in [0, {num_kept - 1}])"
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
        raise ValueError(f"category {name!r} has no {space} columns")
    bad = [i for i in values if not 0 <= i < num_kept]
    if bad:
        raise ValueError(f"category {name!r} has {space}-column index {bad[0]}, outside the {num_kept} {space} columns")
    if len(set(values)) != len(values):
        seen: set[int] = set()
        twice = next(i for i in values if i in seen or seen.add(i))
        raise ValueError(f"category {name!r} lists {space} column {twice} more than once: a category holds each of its "
                         f"columns once")
    return tuple(values)


def check_decoder_categories(decoder_categories: Optional[Mapping], categories: dict[str, tuple[int, ...]],
                             num_kept: int, gap_width: int) -> dict[str, tuple[int, ...]]:
    """decoder_categories {name: decoder-column indices in [0, K + c)}, checked, in categories' order (the
    same names when both are given). Without embedding columns (c = 0) the decoder's columns are the kept
    ones: the categories themselves, and decoder_categories, when given, must be them. {} when a hybrid's
    are not given (then there is no decoder-space category error)."""
    if gap_width == 0:
        if decoder_categories is not None and check_categories(decoder_categories, num_kept, "decoder") != categories:
            raise ValueError(f"decoder_categories differ from categories, but this module's decoder has no embedding "
                             f"columns (target_gap=(0, 0)): its {num_kept} decoder columns are the kept columns, so "
                             f"the two are one; pass target_gap=(at, width) for a hybrid VQ-VAE's decoder")
        return dict(categories)
    out = check_categories(decoder_categories, num_kept + gap_width, "decoder")
    if out and categories and set(out) != set(categories):
        extra = [n for n in out if n not in categories] + [n for n in categories if n not in out]
        raise ValueError(f"decoder_categories and categories must name the same categories (one category in two "
                         f"spaces), but {extra[0]!r} is in only one of them")
    return {name: out[name] for name in categories} if out and categories else out


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def category_members(categories: dict[str, tuple[int, ...]], num_kept: int, device) -> torch.Tensor:
    """members [C, L] int64: category n's distinct columns of num_kept, padded with num_kept (an appended 0)."""
    rows = [sorted(set(idx)) for idx in categories.values()]
    members = torch.full((len(rows), max((len(r) for r in rows), default=0)), num_kept, dtype=torch.int64)
    for n, cols in enumerate(rows):
        members[n, : len(cols)] = torch.tensor(cols, dtype=torch.int64)
    return members.to(device)


def errors_by_category(column_errors: torch.Tensor, members: torch.Tensor, weight: Optional[torch.Tensor],
                       width: int) -> torch.Tensor:
    """E [C] from the column errors [width] (reduction="column"), category_members' members over those
    columns and the loss's weights [width] as they are now (None: unweighted), in column_errors' dtype,
    differentiable. Derived per call, so a weight changed in place or replaced counts at once. A gather, not
    a matrix product: a NaN column stays in its own category; a category of zero total weight gets 0/0 =
    NaN, not a made-up 0."""
    c = column_errors
    if not c.is_floating_point():
        raise TypeError(f'category errors take the floating-point column errors of reduction="column", got {c.dtype}')
    if c.device != members.device:
        raise ValueError(f"the column errors are on {c.device} but the module's buffers on {members.device}: pass "
                         f"the errors of this module's loss, or move the module with .to()")
    wide = c.float() if c.dtype in (torch.float16, torch.bfloat16) else c
    zero = wide.new_zeros(1)
    total = ((members < width).sum(1).to(wide.dtype) if weight is None
             else torch.cat([weight.to(wide.dtype), zero])[members].sum(1))
    out = torch.cat([wide, zero])[members].sum(1) / total
    return out.to(c.dtype) if out.dtype != c.dtype else out


class CategoryErrors:
    """The category surface of a fusedvq module (PlannedModule): category_names, categories and
    decoder_categories, and the errors by category in each space. The module provides num_kept, its
    weights now (_objective_weight: [K] or, for a hybrid's objective, [K + c]; _loss_weight: their kept
    columns') and calls _set_categories once its categories are checked."""

    def _set_categories(self, decoder_categories, gap_width: int) -> None:
        """decoder_categories checked against the K + c decoder columns, and the buffers the category errors
        read: each category's distinct columns in each space (category_members)."""
        K, device = self.num_kept, self.index.device
        self.decoder_categories = check_decoder_categories(decoder_categories, self.categories, K, gap_width)
        W = self._decoder_width = K + gap_width  # K + c: the hybrid objective's column errors
        kept = category_members(self.categories, K, device) if self.categories else None
        wide = category_members(self.decoder_categories, W, device) if self.decoder_categories else None
        self.register_buffer("category_members", kept, persistent=False)
        self.register_buffer("decoder_category_members", wide, persistent=False)

    @property
    def category_names(self) -> tuple[str, ...]:
        """The categories' names, in the checkpoint's order: the order of category_errors (over decoder
        columns) and of feature_category_errors (over kept feature columns) alike."""
        return tuple(self.categories or self.decoder_categories)

    def category_errors(self, column_errors: torch.Tensor) -> torch.Tensor:
        """The per-category errors [C] (category_names' order) in decoder columns, as the trainer logs its
        `{category}/reconstruction_mse`: from the column errors of reduction="column" over the decoder's
        columns: [K] (no embedding columns), or a hybrid objective's [K + c] (with embeddings=), each
        category over its decoder columns (decoder_categories: the INITIAL category's embedding columns
        included). Weighted, each divides by its columns' total weight (fusedvq/categories.py). On the
        errors' device, differentiable, no host synchronization."""
        K, W = self.num_kept, self._decoder_width
        if W == K:
            return self._by_category(column_errors, self.category_members, self._loss_weight(), K, "category_errors")
        if self.decoder_category_members is None:
            raise ValueError(f"category_errors averages over the decoder's {W} columns (K + c = {K} + {W - K}), and "
                             f"this module has no categories in decoder columns: build it with from_checkpoint / "
                             f"from_spec (model_config's group_indices), or pass decoder_categories={{name: decoder-"
                             f"column indices}}; feature_category_errors(errors) gives them over the {K} kept feature "
                             f"columns")
        _refuse_width(column_errors, K, W, feature_columns=False)
        weight = self._objective_weight()
        if weight is not None and weight.shape[0] != W:
            raise ValueError(f"this loss's weight has {weight.shape[0]} entries, one per kept feature column, but the "
                             f"decoder columns' errors are weighted per decoder column (K + c = {W}): with these "
                             f"weights the loss compares the feature columns alone; use feature_category_errors")
        return self._by_category(column_errors, self.decoder_category_members, weight, W, "category_errors")

    def feature_category_errors(self, column_errors: torch.Tensor) -> torch.Tensor:
        """The per-category errors [C] (category_names' order) over the kept feature columns only (categories:
        a hybrid's pre_model_group_indices), from the [K] column errors of reduction="column" without
        embeddings (the feature columns alone: a different objective for a hybrid, docs/hybrid.md). The same
        as category_errors when the decoder has no embedding columns."""
        K, W = self.num_kept, self._decoder_width
        _refuse_width(column_errors, K, W, feature_columns=True)
        return self._by_category(column_errors, self.category_members, self._loss_weight(), K,
                                 "feature_category_errors")

    @staticmethod
    def _by_category(column_errors, members, weight, width: int, method: str) -> torch.Tensor:
        if members is None:
            raise ValueError("this module has no categories: build it with from_checkpoint / from_spec (a categorical "
                             "VQ-VAE), or pass categories={name: kept-column indices}")
        c = column_errors
        if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.shape[0] != width:
            shape = list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f'{method} takes the [{width}] column errors of reduction="column", got {shape}')
        return errors_by_category(c, members, weight, width)


def _refuse_width(column_errors, num_kept: int, width: int, *, feature_columns: bool) -> None:
    """Errors of the other space ([K] where [K + c] are needed, or the other way round): said, naming both."""
    K, W = num_kept, width
    if W == K or not isinstance(column_errors, torch.Tensor) or column_errors.dim() != 1:
        return
    got = column_errors.shape[0]
    if not feature_columns and got == K:
        raise ValueError(
            f'category_errors takes the [{W}] column errors of the hybrid objective (reduction="column" with '
            f"embeddings=: the decoder's K + c = {K} + {W - K} columns), got [{K}]: the errors of the {K} kept "
            f"feature columns alone (the loss without embeddings); pass embeddings= to the loss, or use "
            f"feature_category_errors(errors) for the categories over the {K} kept feature columns")
    if feature_columns and got == W:
        raise ValueError(
            f'feature_category_errors takes the [{K}] column errors of the {K} kept feature columns (reduction='
            f'"column" without embeddings), got [{W}]: the hybrid objective\'s errors over the decoder\'s K + c = '
            f"{K} + {W - K} columns; use category_errors(errors) for the categories in decoder columns (the "
            f"trainer's, embedding columns included)")


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
