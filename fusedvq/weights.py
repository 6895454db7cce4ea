"""The loss's per-column weights: [K] numbers, one per kept column (or [K + c], one per decoder column, for
a hybrid's objective), weights per category name ({name: w}, the others 1), or "balanced" — resolved to
numbers (resolve_weight) and checked once (check_weight), at construction or per functional call.

    "balanced"   w[k] = K / (C·n_c) for k in category c of n_c columns: every category weighs K/C in all,
                 the mean loss is the mean over categories of their errors
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .cpu.hybrid import around_gap
from .strict import as_tensor


def resolve_weight(weight, categories: dict[str, tuple[int, ...]], num_kept: int):
    """The weight argument as per-column weights: None, or a [K] float64 tensor for "balanced" and for
    {category name: weight}; any other value is returned as given (check_weight validates it)."""
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
                    raise ValueError(f"kept column {k} is in categories {owner[k]!r} and {str(name)!r}, which are "
                                     f"given different weights: give per-column weights instead")
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
        raise ValueError(f'weight="balanced" needs categories that hold each kept column once; kept column {k} '
                         f"is in {int(count[k])} of them ({int(bad.numel())} of {num_kept} columns are not in exactly "
                         f"one)")


def check_weight(weight, num_kept: int, dtype: torch.dtype, device: torch.device,
                 gap_width: int = 0) -> torch.Tensor:
    """The loss's per-column weights as a [K] tensor in `dtype` on `device`: 1-D, one per kept column (in the
    loss's column order), real, finite and >= 0 (checked on the host once: one synchronization on CUDA;
    skipped while torch.compile traces, like the statistics' values). With a hybrid's gap_width = c > 0,
    [K + c] too: one per decoder column, for the objective over all K + c columns (calls with embeddings)."""
    weight = resolve_weight(weight, {}, num_kept)  # (a weight by category name, here without categories: refused)
    t = as_tensor(weight, "weight", device)
    if t.dim() != 1 or (t.shape[0] != num_kept and t.shape[0] != num_kept + gap_width):  # (not `in`: sizes
        # may be symbolic while torch.compile traces, and a tuple's `in` does not compare them)
        hybrid = (f", or one per decoder column (K + c = {num_kept + gap_width}) for the objective with "
                  f"embeddings" if gap_width else "")
        raise ValueError(f"weight must be 1-D with one entry per kept column (K = {num_kept}){hybrid}, got shape "
                         f"{tuple(t.shape)}")
    num_kept = t.shape[0]
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"weight must hold real numbers, got {t.dtype}")
    wide = t.to(torch.float64)
    if not torch.compiler.is_compiling():
        bad = ~(torch.isfinite(wide) & (wide >= 0) & torch.isfinite(wide.to(dtype)))
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise ValueError(f"weight must be finite and >= 0 in every kept column (and fit {dtype}); kept column "
                             f"{k} has weight {float(wide[k])} ({int(bad.sum())} of {num_kept} bad)")
    return wide.to(dtype)



def module_weight(weight, categories: dict[str, tuple[int, ...]], num_kept: int, device, gap_width: int = 0):
    """A module's weights [K] float32 from its weight argument: [K] numbers, {category name: weight} (the others
    weigh 1), or "balanced" (resolve_weight); with a gap, [K + gap_width] numbers too (a hybrid's objective, one
    weight per decoder column); None when not given."""
    if weight is None:
        return None
    return check_weight(resolve_weight(weight, categories, num_kept), num_kept, torch.float32, device, gap_width)

def kept_weight(weight, num_kept: int, gap):
    """weight [K], or [K + c] per decoder column (a hybrid's objective) without its c embedding columns."""
    return weight if weight is None or weight.shape[0] == num_kept else around_gap(weight, gap)
