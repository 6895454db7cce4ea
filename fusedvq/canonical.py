"""Arguments → canonical form, with errors that name the numbers. Shared by functional.py, clean.py and
module.py (the checks of the tensors themselves are checks.py's).

Canonical form: features x [B, D] and target r [B, K] of one floating dtype on one device; a ColumnMap
(index [K] int64 in [0, D) and its inverse); shift = μ [K] and scale = 1/σ [K] in the compute dtype, or
None for norm="none". Checks of shapes, dtypes and devices cost nothing; checks of values (index range,
mask count, σ > 0) need the values on the host, so they run once per MaskedMSELoss and once per
masked_mse call in eager mode (skipped while torch.compile traces, where they would break the graph).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .checks import _is_tracing, check_dense
from .columns import build_column_map
from .contract import NORM_STATS, NORMS, REDUCTIONS, STATS_SPACES


def option_code(name: str, value: str, choices: tuple[str, ...]) -> int:
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return choices.index(value)


def reduction_code(reduction: str) -> int:
    return option_code("reduction", reduction, REDUCTIONS)


def norm_code(norm: str) -> int:
    return option_code("norm", norm, NORMS)


def check_eps(eps) -> float:
    """eps as a float: a plain real number, finite and >= 0 (it is a kernel argument, so a string or a
    tensor would fail inside a launch)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number (a Python float such as 1e-8), got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _as_tensor(value, name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_dense(value, name)
        if value.requires_grad:
            raise ValueError(f"{name} requires grad, but fusedvq treats it as a constant: pass {name}.detach()")
        return value.to(device=device, dtype=dtype) if dtype is not None else value.to(device)
    try:
        return torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor, array or sequence of numbers: {err}") from None


def canonical_index(index, num_features: int, device: torch.device, num_kept: Optional[int] = None,
                    check_values: bool = True) -> tuple[torch.Tensor, str]:
    """(index [K] int64 on `device`, "mask" or "index") from a bool mask [D] or integer indices [K].

    num_kept (the target's width), when given, sizes the gather of a bool mask statically, so no
    data-dependent shape appears while torch.compile traces.
    """
    index = index_tensor(index, device, num_features, check_values)
    if index.dtype == torch.bool:
        if index.shape[0] != num_features:
            raise ValueError(
                f"feature_mask has {index.shape[0]} entries but features have {num_features} columns: "
                f"the mask needs one entry per feature column"
            )
        if check_values and not _is_tracing():
            kept = int(index.sum())
            if kept == 0:
                raise ValueError(f"feature_mask keeps none of the {num_features} feature columns")
            if num_kept is not None and kept != num_kept:
                raise ValueError(
                    f"target has {num_kept} columns but the mask keeps {kept} of the {num_features} feature "
                    f"columns — pass the decoder's {kept}-column reconstruction"
                )
            return index.nonzero().squeeze(1), "mask"
        if num_kept is None:
            return index.nonzero().squeeze(1), "mask"
        # Traced: the gather is sized by the target's width; a mask keeping another count fails on the
        # device (no host sync, nothing for the graph to break on) instead of padding with column -1.
        torch._assert_async(index.sum() == num_kept, "the mask keeps a different number of columns than target has")
        return torch.nonzero_static(index, size=num_kept, fill_value=-1).squeeze(1), "mask"
    index = index.long().contiguous()  # the kernels read index[k] at offset k
    if _is_tracing():
        # Traced, a host check would break the graph: an index outside [0, D) fails on the device instead
        # (the kernels never read out of bounds, but would drop that column).
        torch._assert_async(((index >= 0) & (index < num_features)).all(),
                            "index holds a value outside the feature columns [0, D)")
    elif check_values:
        bad = (index < 0) | (index >= num_features)
        if bool(bad.any()):
            first = int(index[bad][0])
            raise ValueError(
                f"index holds {first}, outside the {num_features} feature columns: values must be in "
                f"[0, {num_features - 1}] ({int(bad.sum())} of {index.shape[0]} are out of range)"
            )
    return index, "index"


def index_tensor(index, device: torch.device, num_features: Optional[int], check_values: bool = True) -> torch.Tensor:
    """The index as a 1-D tensor on `device`: a bool mask, or integer column indices (not a mask given as
    numbers). The one check of an index's kind, shared by the functional forms (canonical_index) and the
    modules' constructors, so both give the same errors. num_features: D, or None when not known yet (a
    constructor given integers without num_features): an index of 0s and 1s is then taken to be length D."""
    index = _as_tensor(index, "index", device)
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D (a bool mask [D] or column indices [K]), got shape {tuple(index.shape)}")
    if index.dtype == torch.bool:
        return index
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.uint8:
        raise TypeError(
            f"index must be a bool mask or integer column indices, got {index.dtype} ({index.shape[0]} entries): "
            f"pass mask.bool() for a mask; column indices must be int32 or int64"
        )
    if index.shape[0] == 0:
        raise ValueError("index is empty: it must name at least one feature column")
    if check_values and not _is_tracing():
        _refuse_integer_mask(index, index.shape[0] if num_features is None else num_features)
    return index


def _refuse_integer_mask(index: torch.Tensor, num_features: int) -> None:
    """An integer index of length D >= 3 holding only 0s and 1s is a mask given as numbers: read as indices
    it would be another loss (columns 0 and 1 over and over). For D <= 2 the two readings cannot be told
    apart, and integers are indices, as everywhere else."""
    if index.shape[0] != num_features or num_features < 3:
        return
    if bool(((index == 0) | (index == 1)).all()):
        raise ValueError(
            f"index has {num_features} entries, one per feature column, holding only 0s and 1s: that is a "
            f"mask given as integers, which would be read as column indices (a different loss); pass "
            f"mask.bool()"
        )


def canonical_stats(mean, std, index: torch.Tensor, num_features: int, stats_space: Optional[str],
                    dtype: torch.dtype, device: torch.device, check_values: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift = μ [K], scale = 1/σ [K]) in `dtype`, from μ, σ of length D (raw) or K (masked)."""
    if mean is None or std is None:
        missing = " and ".join(n for n, v in (("mean", mean), ("std", std)) if v is None)
        raise ValueError(f'norm="stats" needs mean and std; {missing} not given (or use norm="batch" / "none")')
    if stats_space is not None:
        option_code("stats_space", stats_space, STATS_SPACES)
    K, D = index.shape[0], num_features
    out = []
    for name, value in (("mean", mean), ("std", std)):
        t = _as_tensor(value, name, device)
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
        n = t.shape[0]
        space = stats_space
        if space is None:
            if D == K and n == D:
                raise ValueError(
                    f"{name} has {n} entries and D == K == {n}, so it could be per feature column or per kept "
                    f"column: pass stats_space='raw' (length D, indexed by the mask) or 'masked' (length K)"
                )
            space = "raw" if n == D else "masked" if n == K else None
        expected = D if space == "raw" else K
        if space is None or n != expected:
            raise ValueError(
                f"{name} has {n} entries but must have one per feature column (D = {D}) or one per kept column "
                f"(K = {K})" + (f"; stats_space={stats_space!r} expects {expected}" if stats_space else "")
            )
        t = t.to(torch.float64)
        out.append(t.index_select(0, index) if space == "raw" else t)
    mu, sigma = out
    if check_values and not _is_tracing():
        _check_stats_values(mu, sigma, index, dtype)
    return mu.to(dtype), sigma.reciprocal().to(dtype)


def _check_stats_values(mu: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> None:
    """μ finite, σ finite and > 0 in every kept column, and so are μ, σ and 1/σ as the kernels hold them
    (in the compute dtype: a float64 μ = 1e39 is inf in float32, σ = 1e-46 is 0, σ = 1e-39 has 1/σ = inf;
    each would give a wrong but finite-looking loss). One host synchronization for all of it."""
    mu_c, sigma_c = mu.to(dtype), sigma.to(dtype)
    bad = torch.stack([
        ~(torch.isfinite(sigma) & (sigma > 0)),
        ~torch.isfinite(mu),
        ~torch.isfinite(mu_c),
        ~(torch.isfinite(sigma_c) & (sigma_c > 0)),
        ~torch.isfinite(sigma_c.reciprocal()),
    ])  # [5, K]
    flags = bad.any(1).tolist()
    if not any(flags):
        return
    K = index.shape[0]
    which = flags.index(True)
    k = int(bad[which].nonzero()[0])
    where = f"kept column {k} (feature column {int(index[k])})"
    count = f"{int(bad[which].sum())} of {K} bad"
    name = str(dtype).replace("torch.", "")
    if which == 0:
        raise ValueError(f"std must be finite and > 0 in every kept column; {where} has std {float(sigma[k])} ({count})")
    if which == 1:
        raise ValueError(f"mean must be finite in every kept column; {where} has mean {float(mu[k])}")
    what, value = {2: ("mean", mu), 3: ("std", sigma), 4: ("1/std", sigma)}[which]
    raise ValueError(
        f"{what} does not fit {name}, the dtype the loss computes in: {where} has "
        f"{'mean' if what == 'mean' else 'std'} {float(value[k])} ({count}); rescale the features and "
        f"statistics, or use float64 features (reference backend)"
    )


def prepare(index, mean, std, num_features: int, num_kept: Optional[int], norm: int, stats_space: Optional[str],
            dtype: torch.dtype, device: torch.device):
    """(ColumnMap, selector, shift, scale) for the given arguments; shift/scale are None unless norm="stats"."""
    idx, selector = canonical_index(index, num_features, device, num_kept)
    columns = build_column_map(idx, num_features)
    if norm == NORM_STATS:
        shift, scale = canonical_stats(mean, std, idx, num_features, stats_space, dtype, device)
        return columns, selector, shift, scale
    for name, value in (("mean", mean), ("std", std)):
        if value is not None:
            raise ValueError(f"{name} was given but norm={NORMS[norm]!r} does not use it")
    return columns, selector, None, None


__all__ = [
    "canonical_index", "canonical_stats", "check_eps", "check_flag", "index_tensor", "norm_code", "option_code",
    "prepare", "reduction_code",
]
